//! zkSync Era transactions: type 0x71, signed as EIP-712 typed data, with paymaster
//! parameters so that the platform's paymaster pays the gas (general flow) and the
//! operator needs no ETH.
//!
//! The typed-data hash that is signed comes from `alloy-zksync`; the wire encoding is
//! written here and checked against the test vectors of zksync-ethers and viem (see the
//! tests), because `alloy-zksync` 1.7.3-alpha.1 can only encode a signed transaction
//! and writes an absent paymaster as an empty string where zkSync reads an empty list.

use alloy::primitives::{Address, Bytes, Signature, B256, U256};
use alloy::rlp::{BufMut, Encodable, Header};
use alloy::signers::local::PrivateKeySigner;
use alloy::signers::SignerSync;
use alloy::sol_types::SolCall;
use alloy_zksync::network::unsigned_tx::eip712::{Eip712Meta, PaymasterParams, TxEip712};

/// The transaction type byte of zkSync's EIP-712 transactions.
pub const EIP712_TX_TYPE: u8 = 0x71;

/// zkSync Era's default limit of L2 gas per byte of published data (zksync-ethers'
/// `DEFAULT_GAS_PER_PUBDATA_LIMIT`).
pub const DEFAULT_GAS_PER_PUBDATA: u64 = 50_000;

alloy::sol! {
    /// The paymaster flows zkSync Era defines; the platform's paymaster serves `general`.
    interface IPaymasterFlow {
        function general(bytes input) external;
    }
}

/// The paymaster input of the general flow with no inner input: `general("")`.
pub fn general_flow_input() -> Bytes {
    IPaymasterFlow::generalCall {
        input: Bytes::new(),
    }
    .abi_encode()
    .into()
}

/// A zkSync EIP-712 transaction (type 0x71), as it is signed and sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Eip712Tx {
    pub chain_id: u64,
    pub nonce: u64,
    pub max_priority_fee_per_gas: u128,
    pub max_fee_per_gas: u128,
    pub gas_limit: u64,
    /// `None` deploys (zkSync then expects the deployer contract; unused here).
    pub to: Option<Address>,
    pub value: U256,
    pub data: Bytes,
    pub from: Address,
    pub gas_per_pubdata: u64,
    pub factory_deps: Vec<Bytes>,
    pub custom_signature: Option<Bytes>,
    /// The paymaster and its input.
    pub paymaster: Option<(Address, Bytes)>,
}

impl Eip712Tx {
    /// The EIP-712 digest the sender signs (domain `zkSync`, version `2`, the chain id).
    pub fn signing_hash(&self) -> B256 {
        use alloy::consensus::SignableTransaction;
        let tx = TxEip712 {
            chain_id: self.chain_id,
            nonce: U256::from(self.nonce),
            gas: self.gas_limit,
            max_fee_per_gas: self.max_fee_per_gas,
            max_priority_fee_per_gas: self.max_priority_fee_per_gas,
            to: self.to.unwrap_or(Address::ZERO),
            from: self.from,
            value: self.value,
            input: self.data.clone(),
            eip712_meta: Some(Eip712Meta {
                gas_per_pubdata: U256::from(self.gas_per_pubdata),
                factory_deps: self.factory_deps.clone(),
                custom_signature: self.custom_signature.clone(),
                paymaster_params: self.paymaster.as_ref().map(|(paymaster, input)| {
                    PaymasterParams {
                        paymaster: *paymaster,
                        paymaster_input: input.clone(),
                    }
                }),
            }),
        };
        tx.signature_hash()
    }

    /// The transaction's wire form: `0x71 || rlp([nonce, maxPriorityFeePerGas,
    /// maxFeePerGas, gasLimit, to, value, data, v, r, s, chainId, from, gasPerPubdata,
    /// factoryDeps, customSignature, [paymaster, paymasterInput]])`. Unsigned, the `v, r,
    /// s` places hold `chainId, "", ""` (as zksync-ethers writes them).
    pub fn encode(&self, signature: Option<&Signature>) -> Vec<u8> {
        let mut fields: Vec<u8> = Vec::with_capacity(256 + self.data.len());
        let out: &mut dyn BufMut = &mut fields;
        self.nonce.encode(out);
        self.max_priority_fee_per_gas.encode(out);
        self.max_fee_per_gas.encode(out);
        self.gas_limit.encode(out);
        match &self.to {
            Some(to) => to.encode(out),
            None => out.put_u8(alloy::rlp::EMPTY_STRING_CODE),
        }
        self.value.encode(out);
        self.data.encode(out);
        match signature {
            Some(signature) => {
                signature.v().encode(out);
                signature.r().encode(out);
                signature.s().encode(out);
            }
            None => {
                self.chain_id.encode(out);
                out.put_u8(alloy::rlp::EMPTY_STRING_CODE);
                out.put_u8(alloy::rlp::EMPTY_STRING_CODE);
            }
        }
        self.chain_id.encode(out);
        self.from.encode(out);
        self.gas_per_pubdata.encode(out);
        self.factory_deps.encode(out);
        match &self.custom_signature {
            Some(custom) => custom.encode(out),
            None => out.put_u8(alloy::rlp::EMPTY_STRING_CODE),
        }
        match &self.paymaster {
            Some((paymaster, input)) => {
                Header {
                    list: true,
                    payload_length: paymaster.length() + input.length(),
                }
                .encode(out);
                paymaster.encode(out);
                input.encode(out);
            }
            None => Header {
                list: true,
                payload_length: 0,
            }
            .encode(out),
        }
        let mut wire = Vec::with_capacity(fields.len() + 10);
        wire.push(EIP712_TX_TYPE);
        Header {
            list: true,
            payload_length: fields.len(),
        }
        .encode(&mut wire);
        wire.extend_from_slice(&fields);
        wire
    }

    /// Signs as `signer` (whose address must be `from`) and returns the transaction's
    /// hash as zkSync computes it (`keccak(signing hash || keccak(signature))`) and its
    /// wire form.
    pub fn sign(&self, signer: &PrivateKeySigner) -> anyhow::Result<(B256, Bytes)> {
        if signer.address() != self.from {
            anyhow::bail!("the signing key is not the transaction's sender");
        }
        let digest = self.signing_hash();
        let signature = signer
            .sign_hash_sync(&digest)
            .map_err(|e| anyhow::anyhow!("signing a zkSync transaction: {e}"))?;
        let mut both = [0u8; 64];
        both[..32].copy_from_slice(digest.as_slice());
        both[32..].copy_from_slice(alloy::primitives::keccak256(signature.as_bytes()).as_slice());
        let hash = alloy::primitives::keccak256(both);
        Ok((hash, self.encode(Some(&signature)).into()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use alloy::eips::Encodable2718;
    use alloy::primitives::{address, hex};

    const ADDRESS1: Address = address!("36615Cf349d7F6344891B1e7CA7C72883F5dc049");
    const ADDRESS2: Address = address!("a61464658AfeAf65CccaaFD3a512b69A83B77618");

    fn hex_of(bytes: &[u8]) -> String {
        format!("0x{}", hex::encode(bytes))
    }

    fn base() -> Eip712Tx {
        Eip712Tx {
            chain_id: 270,
            from: ADDRESS1,
            to: Some(ADDRESS2),
            value: U256::from(1_000_000u64),
            gas_per_pubdata: DEFAULT_GAS_PER_PUBDATA,
            ..Eip712Tx::default()
        }
    }

    // zksync-ethers, tests/unit/utils.test.ts, `#serializeEip712()`.
    #[test]
    fn zksync_ethers_vectors() {
        let defaults = Eip712Tx {
            to: None,
            value: U256::ZERO,
            ..base()
        };
        assert_eq!(
            hex_of(&defaults.encode(None)),
            "0x71ea8080808080808082010e808082010e9436615cf349d7f6344891b1e7ca7c72883f5dc04982c350c080c0"
        );
        assert_eq!(
            hex_of(&base().encode(None)),
            "0x71f8418080808094a61464658afeaf65cccaafd3a512b69a83b77618830f42408082010e808082010e9436615cf349d7f6344891b1e7ca7c72883f5dc04982c350c080c0"
        );
        // The approval-based flow: approvalBased(token, 1, "").
        let approval = hex::decode(
            "949431dc000000000000000000000000841c43fa5d8fffdb9efe3358906f7578d8700dd4\
             0000000000000000000000000000000000000000000000000000000000000001\
             0000000000000000000000000000000000000000000000000000000000000060\
             0000000000000000000000000000000000000000000000000000000000000000",
        )
        .unwrap();
        let with_paymaster = Eip712Tx {
            paymaster: Some((
                address!("a222f0c183AFA73a8Bc1AFb48D34C88c9Bf7A174"),
                approval.into(),
            )),
            ..base()
        };
        assert_eq!(
            hex_of(&with_paymaster.encode(None)),
            "0x71f8dd8080808094a61464658afeaf65cccaafd3a512b69a83b77618830f42408082010e808082010e9436615cf349d7f6344891b1e7ca7c72883f5dc04982c350c080f89b94a222f0c183afa73a8bc1afb48d34c88c9bf7a174b884949431dc000000000000000000000000841c43fa5d8fffdb9efe3358906f7578d8700dd4000000000000000000000000000000000000000000000000000000000000000100000000000000000000000000000000000000000000000000000000000000600000000000000000000000000000000000000000000000000000000000000000"
        );
        // A provided signature (compact form; the top bit of s is the y parity).
        let compact = hex::decode(
            "73a20167b8d23b610b058c05368174495adf7da3a4ed4a57eb6dbdeb1fafc24a\
             af87530d663a0d061f69bb564d2c6fb46ae5ae776bbd4bd2a2a4478b9cd1b42a",
        )
        .unwrap();
        let signature = Signature::from_erc2098(&compact);
        assert_eq!(
            hex_of(&base().encode(Some(&signature))),
            "0x71f87f8080808094a61464658afeaf65cccaafd3a512b69a83b77618830f42408001a073a20167b8d23b610b058c05368174495adf7da3a4ed4a57eb6dbdeb1fafc24aa02f87530d663a0d061f69bb564d2c6fb46ae5ae776bbd4bd2a2a4478b9cd1b42a82010e9436615cf349d7f6344891b1e7ca7c72883f5dc04982c350c080c0"
        );
    }

    // viem, src/zksync/serializers.test.ts: the general paymaster flow, fees, gas,
    // calldata and a custom signature.
    #[test]
    fn viem_vectors() {
        let data = hex::decode(
            "a4136862000000000000000000000000000000000000000000000000000000000000002000000000000000000000000000000000000000000000000000000000000000017900000000000000000000000000000000000000000000000000000000000000",
        )
        .unwrap();
        let paymaster_only = Eip712Tx {
            chain_id: 324,
            nonce: 7,
            max_fee_per_gas: 250_000_000,
            max_priority_fee_per_gas: 2,
            to: Some(address!("111C3E89Ce80e62EE88318C2804920D4c96f92bb")),
            value: U256::from(1_000_000_000_000_000_000u128),
            data: data.into(),
            from: address!("f760bdd822fccf93c44be68d94c45133002b3037"),
            gas_per_pubdata: DEFAULT_GAS_PER_PUBDATA,
            paymaster: Some((
                address!("4B5DF730c2e6b28E17013A1485E5d9BC41Efe021"),
                general_flow_input(),
            )),
            ..Eip712Tx::default()
        };
        assert_eq!(
            hex_of(&paymaster_only.encode(None)),
            "0x71f9010b0702840ee6b2808094111c3e89ce80e62ee88318c2804920d4c96f92bb880de0b6b3a7640000b864a4136862000000000000000000000000000000000000000000000000000000000000002000000000000000000000000000000000000000000000000000000000000000017900000000000000000000000000000000000000000000000000000000000000820144808082014494f760bdd822fccf93c44be68d94c45133002b303782c350c080f85b944b5df730c2e6b28e17013a1485e5d9bc41efe021b8448c5a344500000000000000000000000000000000000000000000000000000000000000200000000000000000000000000000000000000000000000000000000000000000"
        );
        let full = Eip712Tx {
            gas_limit: 158_774,
            custom_signature: Some(hex::decode("d2312deb1e84f7733a83ae1fc55f9cc1f2334fe472e0a494781933b194e173a45d927e67b9222b92467660849efb055422f133cf67588cbcb1874901d3244ddd1c").unwrap().into()),
            ..paymaster_only.clone()
        };
        assert_eq!(
            hex_of(&full.encode(None)),
            "0x71f901500702840ee6b28083026c3694111c3e89ce80e62ee88318c2804920d4c96f92bb880de0b6b3a7640000b864a4136862000000000000000000000000000000000000000000000000000000000000002000000000000000000000000000000000000000000000000000000000000000017900000000000000000000000000000000000000000000000000000000000000820144808082014494f760bdd822fccf93c44be68d94c45133002b303782c350c0b841d2312deb1e84f7733a83ae1fc55f9cc1f2334fe472e0a494781933b194e173a45d927e67b9222b92467660849efb055422f133cf67588cbcb1874901d3244ddd1cf85b944b5df730c2e6b28e17013a1485e5d9bc41efe021b8448c5a344500000000000000000000000000000000000000000000000000000000000000200000000000000000000000000000000000000000000000000000000000000000"
        );
        let deps = Eip712Tx {
            paymaster: None,
            factory_deps: vec![
                hex::decode("ABCDEF").unwrap().into(),
                hex::decode("123456").unwrap().into(),
            ],
            ..paymaster_only
        };
        assert_eq!(
            hex_of(&deps.encode(None)),
            "0x71f8b70702840ee6b2808094111c3e89ce80e62ee88318c2804920d4c96f92bb880de0b6b3a7640000b864a4136862000000000000000000000000000000000000000000000000000000000000002000000000000000000000000000000000000000000000000000000000000000017900000000000000000000000000000000000000000000000000000000000000820144808082014494f760bdd822fccf93c44be68d94c45133002b303782c350c883abcdef8312345680c0"
        );
    }

    /// What the writer sends (signed, through the paymaster) is what `alloy-zksync`
    /// encodes for the same transaction, the signature recovers to the sender, and the
    /// hash is the one zkSync gives the transaction.
    #[test]
    fn signed_transactions_agree_with_alloy_zksync_and_recover_to_the_sender() {
        let signer = PrivateKeySigner::random();
        let tx = Eip712Tx {
            chain_id: 324,
            nonce: 42,
            max_fee_per_gas: 45_250_000,
            max_priority_fee_per_gas: 0,
            gas_limit: 1_234_567,
            to: Some(ADDRESS2),
            data: hex::decode("deadbeef").unwrap().into(),
            from: signer.address(),
            gas_per_pubdata: DEFAULT_GAS_PER_PUBDATA,
            paymaster: Some((ADDRESS1, general_flow_input())),
            ..Eip712Tx::default()
        };
        let (hash, wire) = tx.sign(&signer).unwrap();
        let signature = signer.sign_hash_sync(&tx.signing_hash()).unwrap();
        assert_eq!(
            signature
                .recover_address_from_prehash(&tx.signing_hash())
                .unwrap(),
            signer.address()
        );
        use alloy::consensus::SignableTransaction;
        let theirs = TxEip712 {
            chain_id: tx.chain_id,
            nonce: U256::from(tx.nonce),
            gas: tx.gas_limit,
            max_fee_per_gas: tx.max_fee_per_gas,
            max_priority_fee_per_gas: tx.max_priority_fee_per_gas,
            to: ADDRESS2,
            from: tx.from,
            value: U256::ZERO,
            input: tx.data.clone(),
            eip712_meta: Some(Eip712Meta {
                gas_per_pubdata: U256::from(DEFAULT_GAS_PER_PUBDATA),
                factory_deps: vec![],
                custom_signature: None,
                paymaster_params: Some(PaymasterParams {
                    paymaster: ADDRESS1,
                    paymaster_input: general_flow_input(),
                }),
            }),
        }
        .into_signed(signature);
        let envelope = alloy_zksync::network::tx_envelope::TxEnvelope::Eip712(theirs.clone());
        assert_eq!(hex_of(&wire), hex_of(&envelope.encoded_2718()));
        assert_eq!(hash, *theirs.hash());
        // A key that is not the sender's is refused.
        assert!(tx.sign(&PrivateKeySigner::random()).is_err());
    }

    #[test]
    fn the_general_flow_input_is_general_of_empty_bytes() {
        assert_eq!(
            hex_of(&general_flow_input()),
            "0x8c5a344500000000000000000000000000000000000000000000000000000000000000200000000000000000000000000000000000000000000000000000000000000000"
        );
    }
}
