// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {Operated, Replayable} from "./Operated.sol";

interface IRecordOwner {
    function ownerOf(uint256 tokenId) external view returns (address);
}

/// @notice Consent as the patients gave it: each grant (keyed by the id of the access
/// request it comes from) lets a grantee read a patient's records of some categories
/// (a bitmask over the category bit in the low 8 bits of a token id) and/or some
/// listed tokens, until its expiry or its revocation. Every change carries the id of
/// the log event it comes from and is a no-op when replayed.
contract ConsentRegistry is Operated, Replayable {
    struct Grant {
        address patient;
        address grantee;
        uint32 categories;
        uint64 expiry;
        bool revoked;
    }

    IRecordOwner public immutable records;

    mapping(bytes32 => Grant) public grants;
    mapping(bytes32 => mapping(uint256 => bool)) public coversToken;
    mapping(address => mapping(address => bytes32[])) private _grantsBetween;

    event ConsentGranted(
        bytes32 indexed grantId,
        address indexed patient,
        address indexed grantee,
        uint32 categories,
        uint256[] tokenIds,
        uint64 expiry,
        bytes32 eventId
    );
    event ConsentRevoked(bytes32 indexed grantId, bytes32 eventId);

    error GrantExists(bytes32 grantId);
    error NoSuchGrant(bytes32 grantId);

    constructor(address initialOwner, address initialOperator, IRecordOwner recordToken)
        Operated(initialOwner, initialOperator)
    {
        records = recordToken;
    }

    /// @notice One grant of a batch (the arguments of `grant`).
    struct GrantRequest {
        bytes32 grantId;
        address patient;
        address grantee;
        uint32 categories;
        uint256[] tokenIds;
        uint64 expiry;
        bytes32 eventId;
    }

    function grant(
        bytes32 grantId,
        address patient,
        address grantee,
        uint32 categories,
        uint256[] calldata tokenIds,
        uint64 expiry,
        bytes32 eventId
    ) external onlyOperator {
        _grant(grantId, patient, grantee, categories, tokenIds, expiry, eventId);
    }

    /// @notice Several grants in one transaction, each a no-op when its event id was
    /// already processed; any other failure reverts them all.
    function grantBatch(GrantRequest[] calldata requests) external onlyOperator {
        for (uint256 i = 0; i < requests.length; i++) {
            GrantRequest calldata r = requests[i];
            _grant(r.grantId, r.patient, r.grantee, r.categories, r.tokenIds, r.expiry, r.eventId);
        }
    }

    function _grant(
        bytes32 grantId,
        address patient,
        address grantee,
        uint32 categories,
        uint256[] calldata tokenIds,
        uint64 expiry,
        bytes32 eventId
    ) private {
        if (!_firstTime(eventId)) return;
        if (patient == address(0) || grantee == address(0)) revert ZeroAddress();
        if (grants[grantId].patient != address(0)) revert GrantExists(grantId);
        grants[grantId] = Grant(patient, grantee, categories, expiry, false);
        for (uint256 i = 0; i < tokenIds.length; i++) {
            coversToken[grantId][tokenIds[i]] = true;
        }
        _grantsBetween[patient][grantee].push(grantId);
        emit ConsentGranted(grantId, patient, grantee, categories, tokenIds, expiry, eventId);
    }

    /// @notice Ends a grant (revoked, or expired as the log recorded it).
    function revoke(bytes32 grantId, bytes32 eventId) external onlyOperator {
        if (!_firstTime(eventId)) return;
        Grant storage g = grants[grantId];
        if (g.patient == address(0)) revert NoSuchGrant(grantId);
        g.revoked = true;
        emit ConsentRevoked(grantId, eventId);
    }

    /// @notice Whether `grantee` may read token `tokenId` at time `at` (unix seconds).
    function hasAccess(address grantee, uint256 tokenId, uint64 at) external view returns (bool) {
        address patient;
        try records.ownerOf(tokenId) returns (address holder) {
            patient = holder;
        } catch {
            return false;
        }
        bytes32[] storage ids = _grantsBetween[patient][grantee];
        uint32 categoryBit = uint32(1) << uint8(tokenId & 0xff);
        for (uint256 i = 0; i < ids.length; i++) {
            Grant storage g = grants[ids[i]];
            if (g.revoked || at >= g.expiry) continue;
            if ((g.categories & categoryBit) != 0 || coversToken[ids[i]][tokenId]) return true;
        }
        return false;
    }

    function grantsBetween(address patient, address grantee) external view returns (bytes32[] memory) {
        return _grantsBetween[patient][grantee];
    }
}
