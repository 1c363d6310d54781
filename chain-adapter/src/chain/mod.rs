//! The chain adapter: the platform's contracts (`contracts/`) on an EVM chain, driven
//! by alloy.
//!
//! - [`minter`]: turns `RecordStored` into a record token minted to the patient's
//!   custodial address, and records `RecordTokenMinted` with the transaction.
//!
//! Every call carries the id of the log event it comes from; the contracts ignore an
//! id they have seen, and the adapter looks the effect up on chain before it sends, so
//! a replay from position 0 sends nothing new.

use std::fmt;
use std::time::Duration;

use alloy::network::EthereumWallet;
use alloy::primitives::{Address, Bytes, B256, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;
use alloy::transports::TransportError;
use alloy_zksync::network::unsigned_tx::eip712::PaymasterParams;
pub use alloy_zksync::types::Eip712Fee;
use anyhow::Context;

pub mod merkle;
pub mod minter;
pub mod verify;
pub mod zksync;

pub use alloy::primitives::Address as ChainAddress;
pub use minter::{ChainIntake, ChainWriter};

alloy::sol!(
    #[sol(rpc)]
    RecordToken,
    "../contracts/artifacts/RecordToken.json"
);
alloy::sol!(
    #[sol(rpc)]
    #[allow(clippy::too_many_arguments)]
    ConsentRegistry,
    "../contracts/artifacts/ConsentRegistry.json"
);
alloy::sol!(
    #[sol(rpc)]
    AuditAnchor,
    "../contracts/artifacts/AuditAnchor.json"
);
alloy::sol!(
    #[sol(rpc)]
    Paymaster,
    "../contracts/artifacts/Paymaster.json"
);

/// How transactions are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainMode {
    /// EIP-1559 transactions (anvil, any EVM chain).
    Evm,
    /// zkSync Era transactions of type 0x71, gas paid by the platform's paymaster
    /// (general flow); see [`zksync`].
    Zksync,
}

/// Where the chain is and who the platform is on it.
#[derive(Clone)]
pub struct ChainSettings {
    pub rpc_url: String,
    pub chain_id: u64,
    /// The operator key (hex). Never logged.
    pub private_key: String,
    pub mode: ChainMode,
    pub record_token: Option<Address>,
    pub consent_registry: Option<Address>,
    pub audit_anchor: Option<Address>,
    pub paymaster: Option<Address>,
    /// Blocks a receipt must be buried under before the effect is recorded.
    pub confirmations: u64,
    /// Bound on waiting for one receipt.
    pub receipt_timeout: Duration,
    /// How often the writer looks for due work without being woken.
    pub poll: Duration,
    /// Events per audit anchor (0: none).
    pub anchor_every: u64,
    /// Grants sent together in one transaction, at most (1: one each).
    pub grants_per_transaction: usize,
}

impl fmt::Debug for ChainSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainSettings")
            .field("rpc_url", &self.rpc_url)
            .field("chain_id", &self.chain_id)
            .field("private_key", &"<redacted>")
            .field("mode", &self.mode)
            .field("record_token", &self.record_token)
            .field("consent_registry", &self.consent_registry)
            .field("audit_anchor", &self.audit_anchor)
            .field("paymaster", &self.paymaster)
            .field("confirmations", &self.confirmations)
            .field("grants_per_transaction", &self.grants_per_transaction)
            .finish()
    }
}

/// A connection to the chain as the operator.
#[derive(Clone)]
pub struct Chain {
    pub provider: DynProvider,
    pub operator: Address,
    pub settings: ChainSettings,
    /// Signs zkSync's 0x71 transactions (EIP-1559 ones are signed by the provider's
    /// wallet).
    signer: PrivateKeySigner,
}

/// What a transaction may spend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fees {
    pub gas_limit: u64,
    pub max_fee_per_gas: u128,
    pub max_priority_fee_per_gas: u128,
    /// zkSync only: L2 gas per byte of data published to L1.
    pub gas_per_pubdata: u64,
}

/// How a mined transaction ended, read from its receipt (the fields Ethereum and zkSync
/// receipts share, so a 0x71 receipt reads as well as an EIP-1559 one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mined {
    pub success: bool,
    pub block: u64,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawReceipt {
    block_number: Option<alloy::primitives::U64>,
    status: Option<alloy::primitives::U64>,
}

impl Chain {
    /// Connects (lazily) and checks that the node serves the configured chain id.
    pub async fn connect(settings: ChainSettings) -> anyhow::Result<Chain> {
        let signer: PrivateKeySigner = settings
            .private_key
            .trim()
            .trim_start_matches("0x")
            .parse()
            .map_err(|_| anyhow::anyhow!("ZKSYNC_PRIVATE_KEY is not a 32-byte hex key"))?;
        let operator = signer.address();
        let url = settings
            .rpc_url
            .parse()
            .with_context(|| format!("AFYA_CHAIN_RPC_URL={} is not a URL", settings.rpc_url))?;
        let provider = ProviderBuilder::new()
            .wallet(EthereumWallet::from(signer.clone()))
            .connect_http(url)
            .erased();
        Ok(Chain {
            provider,
            operator,
            settings,
            signer,
        })
    }

    /// The receipt of `hash`, once it is mined (`None` before). Read as plain JSON so
    /// that zkSync's 0x71 receipts, which alloy's Ethereum types refuse, read too.
    pub async fn mined(&self, hash: B256) -> Result<Option<Mined>, TransportError> {
        let receipt: Option<RawReceipt> = self
            .provider
            .raw_request("eth_getTransactionReceipt".into(), (hash,))
            .await?;
        Ok(receipt.and_then(|r| {
            Some(Mined {
                block: r.block_number?.to::<u64>(),
                success: r
                    .status
                    .is_some_and(|s| s == alloy::primitives::U64::from(1)),
            })
        }))
    }

    /// The paymaster and its general-flow input, as every zkSync transaction carries.
    fn paymaster_params(&self) -> anyhow::Result<(Address, Bytes)> {
        let paymaster = self
            .settings
            .paymaster
            .context("AFYA_PAYMASTER_ADDRESS must be set with AFYA_CHAIN_MODE=zksync")?;
        Ok((paymaster, zksync::general_flow_input()))
    }

    /// zkSync's fee estimate (`zks_estimateFee`) for calling `to` with `data` as the
    /// operator through the paymaster: gas limit, fees and gas per pubdata byte.
    pub async fn zksync_fee(&self, to: Address, data: Bytes) -> Result<Eip712Fee, TransportError> {
        use alloy::network::TransactionBuilder;
        let (paymaster, input) = self
            .paymaster_params()
            .map_err(|e| TransportError::local_usage_str(&e.to_string()))?;
        let request = alloy_zksync::network::transaction_request::TransactionRequest::default()
            .with_from(self.operator)
            .with_to(to)
            .with_input(data)
            .with_gas_per_pubdata(U256::from(zksync::DEFAULT_GAS_PER_PUBDATA))
            .with_paymaster_params(PaymasterParams {
                paymaster,
                paymaster_input: input,
            });
        self.provider
            .raw_request("zks_estimateFee".into(), (request,))
            .await
    }

    /// Signs a call to `to` as a 0x71 transaction through the paymaster and sends it;
    /// returns its hash.
    pub async fn send_zksync(
        &self,
        to: Address,
        data: Bytes,
        nonce: u64,
        fees: &Fees,
    ) -> anyhow::Result<B256> {
        let tx = zksync::Eip712Tx {
            chain_id: self.settings.chain_id,
            nonce,
            max_priority_fee_per_gas: fees.max_priority_fee_per_gas,
            max_fee_per_gas: fees.max_fee_per_gas,
            gas_limit: fees.gas_limit,
            to: Some(to),
            value: U256::ZERO,
            data,
            from: self.operator,
            gas_per_pubdata: fees.gas_per_pubdata,
            factory_deps: Vec::new(),
            custom_signature: None,
            paymaster: Some(self.paymaster_params()?),
        };
        let (hash, wire) = tx.sign(&self.signer)?;
        let pending = self.provider.send_raw_transaction(&wire).await?;
        if *pending.tx_hash() != hash {
            tracing::warn!(ours = %hash, node = %pending.tx_hash(), "the node names the transaction differently");
        }
        Ok(*pending.tx_hash())
    }

    /// The chain id the node reports, checked against the configured one.
    pub async fn check_chain_id(&self) -> anyhow::Result<()> {
        let id = self
            .provider
            .get_chain_id()
            .await
            .context("asking the node for its chain id")?;
        if id != self.settings.chain_id {
            anyhow::bail!(
                "the node at AFYA_CHAIN_RPC_URL serves chain {id}, not AFYA_CHAIN_ID={}",
                self.settings.chain_id
            );
        }
        Ok(())
    }

    /// Deploys the four contracts, the operator as their owner and operator; the
    /// paymaster may sponsor calls to the other three. Returns `(NAME, address)`.
    pub async fn deploy(&self) -> anyhow::Result<Vec<(&'static str, Address)>> {
        let p = &self.provider;
        let me = self.operator;
        let token = RecordToken::deploy(p, me, me)
            .await
            .context("deploying RecordToken")?;
        let registry = ConsentRegistry::deploy(p, me, me, *token.address())
            .await
            .context("deploying ConsentRegistry")?;
        let anchor = AuditAnchor::deploy(p, me, me)
            .await
            .context("deploying AuditAnchor")?;
        let paymaster = Paymaster::deploy(p, me, me, U256::ZERO)
            .await
            .context("deploying Paymaster")?;
        for target in [*token.address(), *registry.address(), *anchor.address()] {
            paymaster
                .setTarget(target, true)
                .send()
                .await?
                .get_receipt()
                .await
                .context("allowing a paymaster target")?;
        }
        Ok(vec![
            ("AFYA_RECORD_TOKEN_ADDRESS", *token.address()),
            ("AFYA_CONSENT_REGISTRY_ADDRESS", *registry.address()),
            ("AFYA_AUDIT_ANCHOR_ADDRESS", *anchor.address()),
            ("AFYA_PAYMASTER_ADDRESS", *paymaster.address()),
        ])
    }
}

/// A patient's custodial address, derived from a seed of their own (see
/// `KeyStore::custodial_seed`): the address of the secp256k1 key the seed names (the
/// seed hashed again in the vanishing case that it is not a valid key).
pub fn custodial_address(seed: [u8; 32]) -> Address {
    let mut candidate = B256::from(seed);
    loop {
        if let Ok(signer) = PrivateKeySigner::from_bytes(&candidate) {
            return signer.address();
        }
        candidate = alloy::primitives::keccak256(candidate);
    }
}

/// What a patient signs (EIP-191 `personal_sign`) with the wallet they register, to
/// show they hold it: names the address (checksummed) and the patient.
pub fn wallet_message(patient_id: &str, address: Address) -> String {
    format!(
        "AfyaChain: I hold {} and ask that my medical record tokens be minted to it. Patient {patient_id}.",
        address.to_checksum(None)
    )
}

/// Whether `signature` (65 bytes, hex) is `address`'s `personal_sign` of
/// [`wallet_message`] for this patient.
pub fn proves_wallet(patient_id: &str, address: Address, signature: &str) -> bool {
    let Ok(signature) = signature.trim().parse::<alloy::primitives::Signature>() else {
        return false;
    };
    signature
        .recover_address_from_msg(wallet_message(patient_id, address))
        .is_ok_and(|signer| signer == address)
}

/// A record's token id: its UUID shifted left by 8 bits, its category's chain bit in
/// the low byte.
pub fn token_id(record: uuid::Uuid, category_bit: u8) -> U256 {
    (U256::from(record.as_u128()) << 8) | U256::from(category_bit)
}

/// A log event id as the contracts take it: the UUID's 16 bytes, left-padded.
pub fn event_id(event: uuid::Uuid) -> B256 {
    B256::left_padding_from(event.as_bytes())
}
