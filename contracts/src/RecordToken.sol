// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {Operated, Replayable} from "./Operated.sol";

/// @notice One token per stored medical record, held by the patient's address. Holders
/// cannot transfer or approve it (ERC-721 reads work; transfers revert). Its only
/// metadata is the SHA-256 of the encrypted record. A token id is the record's UUID
/// shifted left by 8 bits, its low 8 bits the record's category (the bit index used by
/// the consent registry's category masks).
contract RecordToken is Operated, Replayable {
    string public constant name = "AfyaChain Record";
    string public constant symbol = "AFYAREC";

    mapping(uint256 => address) private _owners;
    mapping(address => uint256) private _balances;
    mapping(uint256 => bytes32) public contentHash;
    /// Burnt tokens stay burnt: their ids are never minted again (an erased record's
    /// old grants must not come back to life).
    mapping(uint256 => bool) public burned;

    event Transfer(address indexed from, address indexed to, uint256 indexed tokenId);
    event RecordMinted(uint256 indexed tokenId, address indexed patient, bytes32 contentHash, bytes32 indexed eventId);
    event RecordBurned(uint256 indexed tokenId, bytes32 indexed eventId);

    error NonTransferable();
    error TokenExists(uint256 tokenId);
    error TokenBurned(uint256 tokenId);
    error NoSuchToken(uint256 tokenId);

    constructor(address initialOwner, address initialOperator) Operated(initialOwner, initialOperator) {}

    function supportsInterface(bytes4 interfaceId) external pure returns (bool) {
        return interfaceId == 0x01ffc9a7 // ERC-165
            || interfaceId == 0x80ac58cd // ERC-721
            || interfaceId == 0x5b5e139f; // ERC-721 metadata
    }

    function balanceOf(address holder) external view returns (uint256) {
        if (holder == address(0)) revert NoSuchToken(0);
        return _balances[holder];
    }

    function ownerOf(uint256 tokenId) public view returns (address holder) {
        holder = _owners[tokenId];
        if (holder == address(0)) revert NoSuchToken(tokenId);
    }

    /// @notice `data:` JSON holding only the content hash.
    function tokenURI(uint256 tokenId) external view returns (string memory) {
        ownerOf(tokenId);
        return string.concat(
            "data:application/json,{\"content_hash\":\"0x", _hex(contentHash[tokenId]), "\"}"
        );
    }

    function getApproved(uint256 tokenId) external view returns (address) {
        ownerOf(tokenId);
        return address(0);
    }

    function isApprovedForAll(address, address) external pure returns (bool) {
        return false;
    }

    function approve(address, uint256) external pure {
        revert NonTransferable();
    }

    function setApprovalForAll(address, bool) external pure {
        revert NonTransferable();
    }

    function transferFrom(address, address, uint256) external pure {
        revert NonTransferable();
    }

    function safeTransferFrom(address, address, uint256) external pure {
        revert NonTransferable();
    }

    function safeTransferFrom(address, address, uint256, bytes calldata) external pure {
        revert NonTransferable();
    }

    /// @notice Mints `tokenId` to `patient`; a replay of `eventId` does nothing.
    function mint(address patient, uint256 tokenId, bytes32 hash, bytes32 eventId) external onlyOperator {
        _mint(patient, tokenId, hash, eventId);
    }

    /// @notice Several mints in one transaction, each idempotent by its event id.
    function mintBatch(
        address[] calldata patients,
        uint256[] calldata tokenIds,
        bytes32[] calldata hashes,
        bytes32[] calldata eventIds
    ) external onlyOperator {
        uint256 n = tokenIds.length;
        require(patients.length == n && hashes.length == n && eventIds.length == n, "length mismatch");
        for (uint256 i = 0; i < n; i++) {
            _mint(patients[i], tokenIds[i], hashes[i], eventIds[i]);
        }
    }

    /// @notice Burns a token when its record is erased; a replay does nothing.
    function burn(uint256 tokenId, bytes32 eventId) external onlyOperator {
        if (!_firstTime(eventId)) return;
        address holder = ownerOf(tokenId);
        delete _owners[tokenId];
        delete contentHash[tokenId];
        burned[tokenId] = true;
        _balances[holder] -= 1;
        emit Transfer(holder, address(0), tokenId);
        emit RecordBurned(tokenId, eventId);
    }

    function _mint(address patient, uint256 tokenId, bytes32 hash, bytes32 eventId) private {
        if (!_firstTime(eventId)) return;
        if (patient == address(0)) revert ZeroAddress();
        if (_owners[tokenId] != address(0)) revert TokenExists(tokenId);
        if (burned[tokenId]) revert TokenBurned(tokenId);
        _owners[tokenId] = patient;
        _balances[patient] += 1;
        contentHash[tokenId] = hash;
        emit Transfer(address(0), patient, tokenId);
        emit RecordMinted(tokenId, patient, hash, eventId);
    }

    function _hex(bytes32 value) private pure returns (string memory) {
        bytes memory digits = "0123456789abcdef";
        bytes memory out = new bytes(64);
        for (uint256 i = 0; i < 32; i++) {
            out[2 * i] = digits[uint8(value[i]) >> 4];
            out[2 * i + 1] = digits[uint8(value[i]) & 0x0f];
        }
        return string(out);
    }
}
