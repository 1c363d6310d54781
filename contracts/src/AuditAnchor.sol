// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {Operated} from "./Operated.sol";

/// @notice Publishes Merkle roots of contiguous ranges of the event log. Append-only:
/// the first range starts at 1 and each next one right after the previous one;
/// anchoring the same range with the same root again (a replay) does nothing, with
/// another root it reverts.
contract AuditAnchor is Operated {
    struct Anchor {
        bytes32 root;
        uint64 fromPosition;
        uint64 toPosition;
        uint64 anchoredAt;
    }

    Anchor[] private _anchors;

    event LogRangeAnchored(uint256 indexed index, bytes32 root, uint64 fromPosition, uint64 toPosition);

    error NotContiguous(uint64 expectedFrom, uint64 fromPosition);
    error EmptyRange(uint64 fromPosition, uint64 toPosition);
    error RootMismatch(uint256 index);

    constructor(address initialOwner, address initialOperator) Operated(initialOwner, initialOperator) {}

    function anchor(bytes32 root, uint64 fromPosition, uint64 toPosition) external onlyOperator {
        if (toPosition < fromPosition) revert EmptyRange(fromPosition, toPosition);
        uint256 n = _anchors.length;
        // A replay of an anchored range.
        for (uint256 i = n; i > 0; i--) {
            Anchor storage a = _anchors[i - 1];
            if (a.fromPosition == fromPosition && a.toPosition == toPosition) {
                if (a.root != root) revert RootMismatch(i - 1);
                return;
            }
            if (a.toPosition < fromPosition) break;
        }
        uint64 expected = n == 0 ? 1 : _anchors[n - 1].toPosition + 1;
        if (fromPosition != expected) revert NotContiguous(expected, fromPosition);
        _anchors.push(Anchor(root, fromPosition, toPosition, uint64(block.timestamp)));
        emit LogRangeAnchored(n, root, fromPosition, toPosition);
    }

    function anchorCount() external view returns (uint256) {
        return _anchors.length;
    }

    function anchorAt(uint256 index) external view returns (Anchor memory) {
        return _anchors[index];
    }

    /// @notice The next position an anchor must start at.
    function nextPosition() external view returns (uint64) {
        uint256 n = _anchors.length;
        return n == 0 ? 1 : _anchors[n - 1].toPosition + 1;
    }
}
