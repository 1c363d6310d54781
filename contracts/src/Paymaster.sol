// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {Operated} from "./Operated.sol";

/// @dev zkSync Era's transaction as the bootloader hands it to a paymaster (the
/// system contracts' `Transaction` layout).
struct Transaction {
    uint256 txType;
    uint256 from;
    uint256 to;
    uint256 gasLimit;
    uint256 gasPerPubdataByteLimit;
    uint256 maxFeePerGas;
    uint256 maxPriorityFeePerGas;
    uint256 paymaster;
    uint256 nonce;
    uint256 value;
    uint256[4] reserved;
    bytes data;
    bytes signature;
    bytes32[] factoryDeps;
    bytes paymasterInput;
    bytes reservedDynamic;
}

enum ExecutionResult {
    Revert,
    Success
}

interface IPaymaster {
    function validateAndPayForPaymasterTransaction(
        bytes32 txHash,
        bytes32 suggestedSignedHash,
        Transaction calldata transaction
    ) external payable returns (bytes4 magic, bytes memory context);

    function postTransaction(
        bytes calldata context,
        Transaction calldata transaction,
        bytes32 txHash,
        bytes32 suggestedSignedHash,
        ExecutionResult txResult,
        uint256 maxRefundedGas
    ) external payable;
}

/// @dev The paymaster flows of zkSync Era; this paymaster serves the general one.
interface IPaymasterFlow {
    function general(bytes calldata input) external;
}

/// @notice Pays zkSync Era gas for the platform's calls to its own contracts, so nobody
/// needs ETH: only allow-listed senders, only to allow-listed contracts, within a
/// spending cap that the owner sets (and raises as M-Pesa payments fund it).
contract Paymaster is IPaymaster, Operated {
    /// @dev zkSync Era's bootloader, the only caller of the paymaster hooks.
    address public constant BOOTLOADER = address(0x8001);

    mapping(address => bool) public allowedSender;
    mapping(address => bool) public allowedTarget;
    uint256 public spendingCap;
    uint256 public spent;

    event SenderAllowed(address indexed sender, bool allowed);
    event TargetAllowed(address indexed target, bool allowed);
    event SpendingCapSet(uint256 cap);
    event GasSponsored(address indexed sender, address indexed target, uint256 amount);

    error OnlyBootloader(address caller);
    error UnsupportedFlow(bytes4 selector);
    error SenderNotAllowed(address sender);
    error TargetNotAllowed(address target);
    error CapExceeded(uint256 spent, uint256 required, uint256 cap);
    error PaymentFailed();

    constructor(address initialOwner, address initialOperator, uint256 cap) Operated(initialOwner, initialOperator) {
        spendingCap = cap;
        emit SpendingCapSet(cap);
        if (initialOperator != address(0)) {
            allowedSender[initialOperator] = true;
            emit SenderAllowed(initialOperator, true);
        }
    }

    receive() external payable {}

    function setSender(address sender, bool allowed) external onlyOwner {
        allowedSender[sender] = allowed;
        emit SenderAllowed(sender, allowed);
    }

    function setTarget(address target, bool allowed) external onlyOwner {
        allowedTarget[target] = allowed;
        emit TargetAllowed(target, allowed);
    }

    function setSpendingCap(uint256 cap) external onlyOwner {
        spendingCap = cap;
        emit SpendingCapSet(cap);
    }

    function withdraw(address payable to, uint256 amount) external onlyOwner {
        (bool ok,) = to.call{value: amount}("");
        if (!ok) revert PaymentFailed();
    }

    function validateAndPayForPaymasterTransaction(bytes32, bytes32, Transaction calldata transaction)
        external
        payable
        returns (bytes4 magic, bytes memory context)
    {
        if (msg.sender != BOOTLOADER) revert OnlyBootloader(msg.sender);
        if (transaction.paymasterInput.length < 4) revert UnsupportedFlow(bytes4(0));
        bytes4 flow = bytes4(transaction.paymasterInput[0:4]);
        if (flow != IPaymasterFlow.general.selector) revert UnsupportedFlow(flow);
        address sender = address(uint160(transaction.from));
        address target = address(uint160(transaction.to));
        if (!allowedSender[sender]) revert SenderNotAllowed(sender);
        if (!allowedTarget[target]) revert TargetNotAllowed(target);
        uint256 required = transaction.gasLimit * transaction.maxFeePerGas;
        if (spent + required > spendingCap) revert CapExceeded(spent, required, spendingCap);
        spent += required;
        (bool ok,) = payable(BOOTLOADER).call{value: required}("");
        if (!ok) revert PaymentFailed();
        emit GasSponsored(sender, target, required);
        return (IPaymaster.validateAndPayForPaymasterTransaction.selector, context);
    }

    function postTransaction(bytes calldata, Transaction calldata, bytes32, bytes32, ExecutionResult, uint256)
        external
        payable
    {
        if (msg.sender != BOOTLOADER) revert OnlyBootloader(msg.sender);
    }
}
