// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @notice Access control shared by the AfyaChain contracts: only operators (the
/// platform's adapter keys) write; the owner appoints and removes operators and can
/// hand ownership on.
abstract contract Operated {
    address public owner;
    mapping(address => bool) public isOperator;

    event OwnershipTransferred(address indexed previousOwner, address indexed newOwner);
    event OperatorSet(address indexed account, bool enabled);

    error NotOwner(address caller);
    error NotOperator(address caller);
    error ZeroAddress();

    constructor(address initialOwner, address initialOperator) {
        if (initialOwner == address(0)) revert ZeroAddress();
        owner = initialOwner;
        emit OwnershipTransferred(address(0), initialOwner);
        if (initialOperator != address(0)) {
            isOperator[initialOperator] = true;
            emit OperatorSet(initialOperator, true);
        }
    }

    modifier onlyOwner() {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        _;
    }

    modifier onlyOperator() {
        if (!isOperator[msg.sender]) revert NotOperator(msg.sender);
        _;
    }

    function transferOwnership(address newOwner) external onlyOwner {
        if (newOwner == address(0)) revert ZeroAddress();
        emit OwnershipTransferred(owner, newOwner);
        owner = newOwner;
    }

    function setOperator(address account, bool enabled) external onlyOwner {
        if (account == address(0)) revert ZeroAddress();
        isOperator[account] = enabled;
        emit OperatorSet(account, enabled);
    }
}

/// @notice Remembers the ids of the log events already applied, so that replaying the
/// event log onto the chain changes nothing the second time.
abstract contract Replayable {
    mapping(bytes32 => bool) public processed;

    event Replayed(bytes32 indexed eventId);

    /// @return first whether `eventId` is seen for the first time (and is now marked).
    function _firstTime(bytes32 eventId) internal returns (bool first) {
        if (processed[eventId]) {
            emit Replayed(eventId);
            return false;
        }
        processed[eventId] = true;
        return true;
    }
}
