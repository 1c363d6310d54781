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
use alloy::primitives::{Address, B256, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;
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
    /// zkSync Era transactions of type 0x71 through the paymaster (not built yet).
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
            .finish()
    }
}

/// A connection to the chain as the operator.
#[derive(Clone)]
pub struct Chain {
    pub provider: DynProvider,
    pub operator: Address,
    pub settings: ChainSettings,
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
            .wallet(EthereumWallet::from(signer))
            .connect_http(url)
            .erased();
        Ok(Chain {
            provider,
            operator,
            settings,
        })
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

/// A record's token id: its UUID shifted left by 8 bits, its category's chain bit in
/// the low byte.
pub fn token_id(record: uuid::Uuid, category_bit: u8) -> U256 {
    (U256::from(record.as_u128()) << 8) | U256::from(category_bit)
}

/// A log event id as the contracts take it: the UUID's 16 bytes, left-padded.
pub fn event_id(event: uuid::Uuid) -> B256 {
    B256::left_padding_from(event.as_bytes())
}
