//! Chain work from the log, each result recorded back through a command:
//!
//! - every `RecordStored` becomes a token minted to the patient's custodial address
//!   (`RecordTokenMinted`);
//! - every `AccessApproved` becomes a grant in the consent registry, keyed by the
//!   access request, for the doctor's custodial address (`ConsentGrantedOnChain`);
//! - every `AccessRevoked` or `AccessExpired` of a grant on chain becomes a revoke
//!   (`ConsentRevokedOnChain`).
//!
//! [`ChainIntake`] is a checkpointed log consumer that writes the work list
//! (the job queue, worker `chain`) in the same transaction as its checkpoint; [`ChainWriter`] (one
//! active instance, lock `chain_writer`) works through it, one transaction at a time.
//! Before sending, it asks the contract whether the originating event id was already
//! processed and, if so, records the transaction that did it: killed anywhere or
//! replayed from position 0, no record gets a second mint and no new transaction is
//! sent for work already on chain. When the node is unreachable the work waits, with a
//! growing pause, and the API goes on.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use alloy::primitives::{Address, B256};
use alloy::providers::Provider;
use anyhow::Context as _;
use async_trait::async_trait;
use commands::Commands;
use domain::ids::RecordId;
use domain::record::ChainTx;
use eventstore::consumer::ReadModelTx;
use eventstore::jobs::{self, Job};
use eventstore::work::{self, Outcome, WorkerActor};
use eventstore::{Backend, LogCursor, LogHandler, Store, StoredEvent};
use tokio::sync::{watch, Mutex};

use super::{
    custodial_address, event_id, token_id, Chain, ChainMode, ConsentRegistry, Fees, RecordToken,
};
use crate::storage::remote::one_line;
use domain::access::{AccessStatus, ChainReceipt};
use domain::ids::AccessRequestId;

/// The writer's consumer lock.
pub const LOCK_NAME: &str = "chain_writer";

/// The writer's name in the job queue.
pub const WORKER: &str = "chain";

/// Queues chain work from the log: a mint for each record's first `RecordStored`, a
/// grant or revoke for each consent decision, and an anchor every `anchor_every`
/// events. Every event's Merkle leaf is kept by position with its ordinal (its place
/// in the log, from 1, as `audit verify` counts), anchoring on or off, so a replay of
/// the log adds no leaf twice and turning anchoring on later numbers events the same.
pub struct ChainIntake {
    /// Events per audit anchor; 0: no anchors.
    pub anchor_every: u64,
}

#[async_trait]
impl LogHandler for ChainIntake {
    fn name(&self) -> &str {
        "chain_intake"
    }

    /// An intake: it queues work, which a rebuild keeps.
    fn kind(&self) -> eventstore::Kind {
        eventstore::Kind::Reactor
    }

    fn schema(&self, _: Backend) -> Vec<String> {
        vec![
            "CREATE TABLE IF NOT EXISTS chain_log_leaves (
                position BIGINT PRIMARY KEY,
                ordinal BIGINT NOT NULL UNIQUE,
                leaf TEXT NOT NULL
            )"
            .into(),
            "CREATE TABLE IF NOT EXISTS chain_anchor_ranges (
                to_ordinal BIGINT PRIMARY KEY,
                from_ordinal BIGINT NOT NULL
            )"
            .into(),
        ]
    }

    /// The work list is the adapter's delivery state, not a read model: a rebuild
    /// keeps it (the writer skips what is already done).
    fn tables(&self) -> Vec<String> {
        Vec::new()
    }

    async fn apply(&self, tx: &mut ReadModelTx, event: &StoredEvent) -> anyhow::Result<()> {
        self.add_leaf(tx, event).await?;
        let kind = match (event.aggregate_type.as_str(), event.event_type.as_str()) {
            ("medical_record", "RecordStored") => "mint",
            ("access_request", "AccessApproved") => "grant",
            ("access_request", "AccessRevoked" | "AccessExpired") => "revoke",
            _ => return Ok(()),
        };
        jobs::enqueue_event(&mut **tx, WORKER, kind, &event.aggregate_id, event)
            .await
            .context("queueing chain work")?;
        Ok(())
    }
}

impl ChainIntake {
    async fn add_leaf(&self, tx: &mut ReadModelTx, event: &StoredEvent) -> anyhow::Result<()> {
        let known: Option<i64> =
            sqlx::query_scalar("SELECT ordinal FROM chain_log_leaves WHERE position = $1")
                .bind(event.position)
                .fetch_optional(&mut **tx)
                .await
                .context("looking up a log leaf")?;
        if known.is_some() {
            return Ok(());
        }
        let last: Option<i64> = sqlx::query_scalar("SELECT MAX(ordinal) FROM chain_log_leaves")
            .fetch_one(&mut **tx)
            .await
            .context("reading the last log ordinal")?;
        let ordinal = last.unwrap_or(0) + 1;
        sqlx::query("INSERT INTO chain_log_leaves (position, ordinal, leaf) VALUES ($1, $2, $3)")
            .bind(event.position)
            .bind(ordinal)
            .bind(super::merkle::leaf(event).to_string())
            .execute(&mut **tx)
            .await
            .context("keeping a log leaf")?;
        if self.anchor_every == 0 {
            return Ok(());
        }
        // The next range starts where the last one queued ended, whatever
        // AFYA_CHAIN_ANCHOR_EVERY was then: ranges stay contiguous when it changes.
        let last_end: Option<i64> =
            sqlx::query_scalar("SELECT MAX(to_ordinal) FROM chain_anchor_ranges")
                .fetch_one(&mut **tx)
                .await
                .context("reading the last anchored range")?;
        let mut from = last_end.unwrap_or(0) + 1;
        let every = i64::try_from(self.anchor_every).unwrap_or(i64::MAX);
        // Anchoring turned on after many events: their ranges all come now.
        while ordinal - from + 1 >= every {
            let to = from + every - 1;
            sqlx::query(
                "INSERT INTO chain_anchor_ranges (to_ordinal, from_ordinal) VALUES ($1, $2)",
            )
            .bind(to)
            .bind(from)
            .execute(&mut **tx)
            .await
            .context("keeping an anchored range")?;
            jobs::enqueue_event(&mut **tx, WORKER, "anchor", &format!("{from}-{to}"), event)
                .await
                .context("queueing an anchor")?;
            from = to + 1;
        }
        Ok(())
    }
}

enum Failure {
    /// The node failed to answer: the chain's fault, not the job's (a probe decides).
    Node(anyhow::Error),
    /// This job cannot be done (its record or patient is gone, the call reverted).
    Job(String),
    /// This job must wait for another (its grant, an earlier range): put off, not
    /// counted against it.
    Wait(anyhow::Error),
}

struct State {
    /// Whether the node was checked since the lock was taken (see `preflight`).
    checked: bool,
    pause: Duration,
}

/// The chain writer's work (see the module documentation).
pub struct Writer {
    store: Store,
    commands: Arc<Commands>,
    chain: Chain,
    token: Address,
    registry: Option<Address>,
    max_attempts: i64,
    state: Mutex<State>,
}

const MIN_PAUSE: Duration = Duration::from_secs(1);
/// Due jobs read per round.
const JOBS_PER_ROUND: usize = 64;
/// Replacements of a transaction not mined in time.
const FEE_BUMPS: u32 = 3;
/// After the last replacement, receipt timeouts waited before giving up on the nonce.
const LAST_WAIT: u32 = 10;
const RECEIPT_POLL: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(60);

impl Writer {
    async fn round(&self, round: &work::Round) -> anyhow::Result<Outcome> {
        let mut state = self.state.lock().await;
        if round.stopping() {
            return Ok(Outcome::Idle);
        }
        if !state.checked {
            let checked = tokio::select! {
                checked = self.preflight() => checked,
                _ = round.stopped() => return Ok(Outcome::Idle),
            };
            match checked {
                Ok(()) => state.checked = true,
                Err(Failure::Job(reason)) => {
                    tracing::error!(error = %reason, "chain writer cannot start; no transaction is sent");
                    return Ok(Outcome::Pause(MAX_PAUSE));
                }
                Err(Failure::Node(error) | Failure::Wait(error)) => {
                    let error = one_line(&format!("{error:#}"));
                    tracing::warn!(%error, pause = ?state.pause, "chain node unavailable; chain work waits");
                    let pause = state.pause;
                    state.pause = (state.pause * 2).min(MAX_PAUSE);
                    return Ok(Outcome::Pause(pause));
                }
            }
        }
        let pool = self.store.any_pool();
        let jobs = jobs::due(pool, WORKER, None, JOBS_PER_ROUND as i64).await?;
        let full = jobs.len() == JOBS_PER_ROUND;
        // Due grants go together in one transaction, where the first of them stood.
        let mut units: Vec<Vec<Job>> = Vec::new();
        let mut grants: Option<usize> = None;
        for job in jobs {
            match grants {
                Some(i)
                    if job.kind == "grant"
                        && units[i].len() < self.chain.settings.grants_per_transaction =>
                {
                    units[i].push(job)
                }
                _ => {
                    if job.kind == "grant" {
                        grants = Some(units.len());
                    }
                    units.push(vec![job]);
                }
            }
        }
        for unit in units {
            // A round can be long: the lock is checked before each transaction, so a
            // standby that took over never races this one for nonces.
            if !round.still_active().await {
                tracing::warn!("chain writer lost its lock; standing by");
                return Ok(Outcome::Idle);
            }
            let outcomes = tokio::select! {
                outcomes = self.run_unit(unit) => outcomes,
                _ = round.stopped() => return Ok(Outcome::Idle),
            };
            // Whether the node is down is asked once per unit, and every job of the
            // unit is settled before the writer pauses.
            let mut node_down: Option<bool> = None;
            for (job, result) in outcomes {
                match result {
                    Ok(()) => {
                        jobs::finish(pool, &job).await?;
                        state.pause = MIN_PAUSE;
                    }
                    Err(Failure::Node(error))
                        if match node_down {
                            Some(down) => down,
                            None => *node_down.insert(!self.node_answers().await),
                        } =>
                    {
                        let error = one_line(&format!("{error:#}"));
                        tracing::warn!(%error, pause = ?state.pause, "chain node unavailable; chain work waits");
                        self.put_off(&job, jobs::after(state.pause), &error).await?;
                    }
                    Err(Failure::Node(error)) => {
                        self.count(&job, &one_line(&format!("{error:#}"))).await?;
                    }
                    Err(Failure::Job(reason)) => self.count(&job, &reason).await?,
                    Err(Failure::Wait(reason)) => {
                        let reason = format!("{reason:#}");
                        self.put_off(&job, jobs::after(MIN_PAUSE), &reason).await?;
                    }
                }
            }
            if node_down == Some(true) {
                let pause = state.pause;
                state.pause = (state.pause * 2).min(MAX_PAUSE);
                return Ok(Outcome::Pause(pause));
            }
        }
        Ok(if full { Outcome::More } else { Outcome::Idle })
    }

    /// Before the first transaction of a run: the node must serve the configured
    /// chain, and transactions an earlier run left in the mempool are given the receipt
    /// timeout to be mined, so that their effects are seen (and not sent again under a
    /// new nonce) when their jobs come up.
    async fn preflight(&self) -> Result<(), Failure> {
        let provider = &self.chain.provider;
        let node = |e: alloy::transports::TransportError| Failure::Node(e.into());
        let id = provider.get_chain_id().await.map_err(node)?;
        if id != self.chain.settings.chain_id {
            return Err(Failure::Job(format!(
                "the node at AFYA_CHAIN_RPC_URL serves chain {id}, not AFYA_CHAIN_ID={}",
                self.chain.settings.chain_id
            )));
        }
        let deadline = Instant::now() + self.chain.settings.receipt_timeout;
        loop {
            let mined = provider
                .get_transaction_count(self.chain.operator)
                .latest()
                .await
                .map_err(node)?;
            let pending = provider
                .get_transaction_count(self.chain.operator)
                .pending()
                .await
                .map_err(node)?;
            if pending <= mined {
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    mined,
                    pending,
                    "transactions of an earlier run are still pending; new ones queue behind them"
                );
                return Ok(());
            }
            tokio::time::sleep(RECEIPT_POLL * 4).await;
        }
    }

    async fn node_answers(&self) -> bool {
        matches!(
            tokio::time::timeout(
                Duration::from_secs(3),
                self.chain.provider.get_block_number()
            )
            .await,
            Ok(Ok(_))
        )
    }

    async fn count(&self, job: &Job, reason: &str) -> anyhow::Result<()> {
        let attempts = job.attempts + 1;
        let dead = attempts >= self.max_attempts;
        let delay = jobs::backoff(MIN_PAUSE * 2, MAX_PAUSE, attempts.min(9));
        if dead {
            tracing::error!(kind = %job.kind, subject = %job.subject, attempts, error = %reason, "chain job failed for good; dead-lettered");
        } else {
            tracing::warn!(kind = %job.kind, subject = %job.subject, attempts, error = %reason, "chain job failed; will retry");
        }
        self.record(job, attempts, jobs::after(delay), reason, dead)
            .await
    }

    /// Puts `job` off until `next` without counting an attempt.
    async fn put_off(&self, job: &Job, next: i64, error: &str) -> anyhow::Result<()> {
        self.record(job, job.attempts, next, error, false).await
    }

    /// Records `attempts` and the next attempt (or a dead letter) for `job` as it was
    /// read: the update is guarded by what was read, so a job another run has moved
    /// meanwhile is left as that run left it.
    async fn record(
        &self,
        job: &Job,
        attempts: i64,
        next: i64,
        error: &str,
        dead: bool,
    ) -> anyhow::Result<()> {
        let outcome = jobs::Outcome {
            state: if dead { "dead" } else { "pending" },
            attempts,
            next_attempt_at: next,
            error,
        };
        if !jobs::record(self.store.any_pool(), job, &outcome).await? {
            tracing::debug!(kind = %job.kind, subject = %job.subject, "chain job moved by another run meanwhile; left as it is");
        }
        Ok(())
    }

    /// One job, or several grants in one transaction.
    async fn run_unit(&self, mut unit: Vec<Job>) -> Vec<(Job, Result<(), Failure>)> {
        if unit.len() > 1 {
            return self.grant_batch(unit).await;
        }
        let mut outcomes = Vec::with_capacity(1);
        if let Some(job) = unit.pop() {
            let result = self.run(&job).await;
            outcomes.push((job, result));
        }
        outcomes
    }

    async fn run(&self, job: &Job) -> Result<(), Failure> {
        match job.kind.as_str() {
            "mint" => self.mint(job).await,
            "grant" => self.grant(job).await,
            "revoke" => self.revoke(job).await,
            "anchor" => self.anchor(job).await,
            other => Err(Failure::Job(format!("unknown chain job kind {other}"))),
        }
    }

    async fn mint(&self, job: &Job) -> Result<(), Failure> {
        let record_id = RecordId::parse(&job.subject)
            .map_err(|_| Failure::Job("the job's record id is not valid".into()))?;
        let record = self
            .commands
            .record(record_id)
            .await
            .map_err(Failure::Node)?
            .ok_or_else(|| Failure::Job("no such record".into()))?;
        if record.token().is_some() {
            return Ok(());
        }
        let (Some(patient), Some(category), Some(sha256)) =
            (record.patient_id(), record.category(), record.sha256())
        else {
            return Err(Failure::Job("the record has no content".into()));
        };
        let Some(holder) = self.patient_address(patient).await? else {
            // Erased: no address of theirs is left to mint to, and nothing is owed.
            tracing::info!(record_id = %record_id, "the patient was erased; no token minted");
            return Ok(());
        };
        let token = token_id(record_id.as_uuid(), category.chain_bit());
        let hash = B256::from_str(sha256.as_str())
            .map_err(|_| Failure::Job("the record's hash is not 32 bytes".into()))?;
        let eid = self.origin(job)?;
        let contract = RecordToken::new(self.token, self.chain.provider.clone());
        let already = contract
            .processed(eid)
            .call()
            .await
            .map_err(|e| Failure::Node(e.into()))?;
        let (tx_hash, block) = if already {
            // Done by an earlier run (killed before recording it): find that mint.
            self.find(contract.RecordMinted_filter().topic3(eid))
                .await?
        } else {
            self.confirmed(contract.mint(holder, token, hash, eid))
                .await?
        };
        self.commands
            .mark_minted(
                record_id,
                ChainTx {
                    chain_id: self.chain.settings.chain_id,
                    contract: self.token.to_string(),
                    token_id: token.to_string(),
                    tx_hash: tx_hash.to_string(),
                    block,
                },
            )
            .await
            .map_err(|e| Failure::Node(anyhow::anyhow!(e)))?;
        tracing::info!(record_id = %record_id, tx = %tx_hash, "record token minted");
        Ok(())
    }
}

impl Writer {
    /// Where a patient's tokens are held, and so the patient in their grants: the
    /// wallet they registered, else their custodial address (which the patient record
    /// then keeps for good, so a wallet registered later cannot split their tokens).
    /// `None` once the patient is erased.
    async fn patient_address(
        &self,
        patient: domain::ids::PatientId,
    ) -> Result<Option<Address>, Failure> {
        let Some(custodial) = self.custodial(&patient.to_string()).await? else {
            return Ok(None);
        };
        let wallet = self
            .commands
            .patient_chain_wallet(patient)
            .await
            .map_err(|e| Failure::Node(anyhow::anyhow!(e)))?;
        match wallet {
            None => Ok(Some(custodial)),
            Some(wallet) => wallet
                .parse()
                .map(Some)
                .map_err(|_| Failure::Job("the patient's wallet is not an address".into())),
        }
    }

    /// A party's custodial address; `None` once the party is erased.
    async fn custodial(&self, subject: &str) -> Result<Option<Address>, Failure> {
        let seed = self
            .commands
            .keys()
            .custodial_seed(subject)
            .await
            .map_err(Failure::Node)?;
        Ok(seed.map(custodial_address))
    }

    fn registry(
        &self,
    ) -> Result<ConsentRegistry::ConsentRegistryInstance<alloy::providers::DynProvider>, Failure>
    {
        let address = self
            .registry
            .ok_or_else(|| Failure::Job("AFYA_CONSENT_REGISTRY_ADDRESS is not set".into()))?;
        Ok(ConsentRegistry::new(address, self.chain.provider.clone()))
    }

    fn receipt(&self, contract: Address, tx_hash: B256, block: u64) -> ChainReceipt {
        ChainReceipt {
            chain_id: self.chain.settings.chain_id,
            contract: contract.to_string(),
            tx_hash: tx_hash.to_string(),
            block,
        }
    }

    async fn access(
        &self,
        job: &Job,
    ) -> Result<(AccessRequestId, domain::access::AccessRequest), Failure> {
        let request_id = AccessRequestId::parse(&job.subject)
            .map_err(|_| Failure::Job("the job's request id is not valid".into()))?;
        let request = self
            .commands
            .access_request(request_id)
            .await
            .map_err(Failure::Node)?
            .ok_or_else(|| Failure::Job("no such access request".into()))?;
        Ok((request_id, request))
    }

    /// Sends `call` and waits for it to be mined and buried under the configured
    /// confirmations. The nonce is the node's pending count for the operator (so a
    /// restart picks up where the chain is); a transaction not mined within the receipt
    /// timeout is replaced, same nonce, with fees raised by a quarter, up to
    /// `FEE_BUMPS` times; whichever of them is mined counts. In zkSync mode the call goes
    /// as a 0x71 transaction through the paymaster, its fees from `zks_estimateFee`.
    async fn confirmed(
        &self,
        call: alloy::contract::CallBuilder<
            &alloy::providers::DynProvider,
            std::marker::PhantomData<impl alloy::sol_types::SolCall>,
        >,
    ) -> Result<(B256, u64), Failure> {
        let chain = &self.chain;
        let provider = &chain.provider;
        let node = |e: alloy::transports::TransportError| Failure::Node(e.into());
        let Some(alloy::primitives::TxKind::Call(to)) = call.clone().into_transaction_request().to
        else {
            return Err(Failure::Job("a contract call without a contract".into()));
        };
        let data = call.calldata().clone();
        let nonce = provider
            .get_transaction_count(chain.operator)
            .pending()
            .await
            .map_err(node)?;
        // Gas is estimated once, against the chain as mined: a replacement estimated
        // later would see its own pending predecessor's effect and get too little.
        let mut fees = match chain.settings.mode {
            ChainMode::Evm => {
                let estimate = provider.estimate_eip1559_fees().await.map_err(node)?;
                let gas = call.estimate_gas().await.map_err(|e| match e {
                    alloy::contract::Error::TransportError(e) => estimate_failure(e),
                    other => Failure::Node(other.into()),
                })?;
                Fees {
                    gas_limit: gas.saturating_add(gas / 5),
                    max_fee_per_gas: estimate.max_fee_per_gas,
                    max_priority_fee_per_gas: estimate.max_priority_fee_per_gas,
                    gas_per_pubdata: 0,
                }
            }
            ChainMode::Zksync => {
                let estimate = chain
                    .zksync_fee(to, data.clone())
                    .await
                    .map_err(estimate_failure)?;
                Fees {
                    gas_limit: estimate.gas_limit.saturating_add(estimate.gas_limit / 5),
                    max_fee_per_gas: estimate.max_fee_per_gas,
                    max_priority_fee_per_gas: estimate.max_priority_fee_per_gas,
                    gas_per_pubdata: estimate.gas_per_pubdata_limit.saturating_to(),
                }
            }
        };
        let mut sent: Vec<B256> = Vec::new();
        for bump in 0..=FEE_BUMPS {
            if bump > 0 {
                fees.max_fee_per_gas = fees
                    .max_fee_per_gas
                    .saturating_add(fees.max_fee_per_gas / 4 + 1);
                fees.max_priority_fee_per_gas = fees
                    .max_priority_fee_per_gas
                    .saturating_add(fees.max_priority_fee_per_gas / 4 + 1);
                tracing::warn!(
                    nonce,
                    bump,
                    "transaction not mined in time; replacing it with higher fees"
                );
            }
            let sending = match chain.settings.mode {
                ChainMode::Evm => call
                    .clone()
                    .nonce(nonce)
                    .gas(fees.gas_limit)
                    .max_fee_per_gas(fees.max_fee_per_gas)
                    .max_priority_fee_per_gas(fees.max_priority_fee_per_gas)
                    .send()
                    .await
                    .map(|pending| *pending.tx_hash())
                    .map_err(anyhow::Error::from),
                ChainMode::Zksync => chain.send_zksync(to, data.clone(), nonce, &fees).await,
            };
            match sending {
                Ok(hash) => sent.push(hash),
                // An earlier one may have been mined meanwhile ("nonce too low"):
                // the receipts below tell.
                Err(error) if !sent.is_empty() => {
                    tracing::warn!(error = %one_line(&format!("{error:#}")), "replacement not accepted")
                }
                Err(error) => return Err(Failure::Node(error)),
            }
            if let Some(done) = self
                .first_mined(&sent, chain.settings.receipt_timeout)
                .await?
            {
                return Ok(done);
            }
        }
        // The bumps are spent: go on waiting for one of them to be mined rather than
        // send the call again under a new nonce.
        if let Some(done) = self
            .first_mined(&sent, chain.settings.receipt_timeout * LAST_WAIT)
            .await?
        {
            return Ok(done);
        }
        Err(Failure::Node(anyhow::anyhow!(
            "no receipt for nonce {nonce} after {FEE_BUMPS} fee bumps"
        )))
    }

    /// Waits up to `wait` for any of `sent` to be mined, then for its confirmations.
    async fn first_mined(
        &self,
        sent: &[B256],
        wait: Duration,
    ) -> Result<Option<(B256, u64)>, Failure> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            for hash in sent {
                let Some(mined) = self
                    .chain
                    .mined(*hash)
                    .await
                    .map_err(|e| Failure::Node(e.into()))?
                else {
                    continue;
                };
                self.buried(mined.block).await?;
                if !mined.success {
                    return Err(Failure::Job("the transaction reverted".into()));
                }
                return Ok(Some((*hash, mined.block)));
            }
            tokio::time::sleep(RECEIPT_POLL).await;
        }
        Ok(None)
    }

    /// Waits until `block` has the configured number of confirmations.
    async fn buried(&self, block: u64) -> Result<(), Failure> {
        let wanted = block + self.chain.settings.confirmations.max(1) - 1;
        let deadline = Instant::now() + self.chain.settings.receipt_timeout;
        loop {
            let head = self
                .chain
                .provider
                .get_block_number()
                .await
                .map_err(|e| Failure::Node(e.into()))?;
            if head >= wanted {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Failure::Node(anyhow::anyhow!(
                    "block {block} not confirmed in time"
                )));
            }
            tokio::time::sleep(RECEIPT_POLL).await;
        }
    }

    /// An approval: the grant, for the doctor's custodial address, keyed by the request.
    async fn grant(&self, job: &Job) -> Result<(), Failure> {
        let Some((request_id, grant)) = self.prepare_grant(job).await? else {
            return Ok(());
        };
        let registry = self.registry()?;
        let (tx_hash, block) = self
            .confirmed(registry.grant(
                grant.grantId,
                grant.patient,
                grant.grantee,
                grant.categories,
                grant.tokenIds,
                grant.expiry,
                grant.eventId,
            ))
            .await?;
        self.record_consent(request_id, false, tx_hash, block).await
    }

    /// Several approvals in one transaction (`grantBatch`); each job's outcome. A batch
    /// that reverts is sent again one grant at a time, so that only a grant that cannot
    /// be made fails.
    async fn grant_batch(&self, jobs: Vec<Job>) -> Vec<(Job, Result<(), Failure>)> {
        let mut outcomes = Vec::with_capacity(jobs.len());
        let mut ready = Vec::with_capacity(jobs.len());
        for job in jobs {
            match self.prepare_grant(&job).await {
                Ok(Some(grant)) => ready.push((job, grant)),
                Ok(None) => outcomes.push((job, Ok(()))),
                Err(failure) => outcomes.push((job, Err(failure))),
            }
        }
        if ready.len() < 2 {
            for (job, _) in ready {
                let result = self.grant(&job).await;
                outcomes.push((job, result));
            }
            return outcomes;
        }
        let sent = match self.registry() {
            Ok(registry) => {
                let requests = ready.iter().map(|(_, (_, grant))| grant.clone()).collect();
                self.confirmed(registry.grantBatch(requests)).await
            }
            Err(failure) => Err(failure),
        };
        match sent {
            Ok((tx_hash, block)) => {
                tracing::info!(grants = ready.len(), tx = %tx_hash, "consents granted on chain in one transaction");
                for (job, (request_id, _)) in ready {
                    let result = self.record_consent(request_id, false, tx_hash, block).await;
                    outcomes.push((job, result));
                }
            }
            Err(Failure::Job(reason)) => {
                tracing::warn!(error = %reason, grants = ready.len(), "a batch of grants failed; sending them one at a time");
                for (job, _) in ready {
                    let result = self.grant(&job).await;
                    outcomes.push((job, result));
                }
            }
            Err(Failure::Node(error)) if self.node_answers().await => {
                let error = one_line(&format!("{error:#}"));
                tracing::warn!(%error, grants = ready.len(), "a batch of grants failed; sending them one at a time");
                for (job, _) in ready {
                    let result = self.grant(&job).await;
                    outcomes.push((job, result));
                }
            }
            Err(Failure::Node(error) | Failure::Wait(error)) => {
                let error = format!("{error:#}");
                for (job, _) in ready {
                    outcomes.push((job, Err(Failure::Node(anyhow::anyhow!(error.clone())))));
                }
            }
        }
        outcomes
    }

    /// What an approval puts on chain, or `None` when there is nothing to send: the
    /// grant is recorded already, was sent by an earlier run (recorded now), or the
    /// request ended before it reached the chain.
    async fn prepare_grant(
        &self,
        job: &Job,
    ) -> Result<Option<(AccessRequestId, ConsentRegistry::GrantRequest)>, Failure> {
        let (request_id, request) = self.access(job).await?;
        if request.granted_on_chain().is_some() {
            return Ok(None);
        }
        let grant_id = event_id(request_id.as_uuid());
        let eid = self.origin(job)?;
        let registry = self.registry()?;
        if registry
            .processed(eid)
            .call()
            .await
            .map_err(|e| Failure::Node(e.into()))?
        {
            // Sent by an earlier run (even if the request has ended since): record
            // it, so that the revoke that may follow finds it.
            let (tx_hash, block) = self
                .find(registry.ConsentGranted_filter().topic1(grant_id))
                .await?;
            self.record_consent(request_id, false, tx_hash, block)
                .await?;
            return Ok(None);
        }
        if request.status() != AccessStatus::Approved {
            // Ended before it reached the chain: nothing to put there.
            return Ok(None);
        }
        let (Some(patient), Some(doctor), Some(expires_at)) = (
            request.patient_id(),
            request.doctor_id(),
            request.expires_at(),
        ) else {
            return Err(Failure::Job("the request is incomplete".into()));
        };
        let (Some(patient_address), Some(doctor_address)) = (
            self.patient_address(patient).await?,
            self.custodial(&doctor.to_string()).await?,
        ) else {
            tracing::info!(request_id = %request_id, "a party was erased; no grant sent");
            return Ok(None);
        };
        let scope = request.scope();
        let categories = scope
            .categories
            .iter()
            .fold(0u32, |mask, c| mask | (1u32 << c.chain_bit()));
        let mut tokens = Vec::with_capacity(scope.record_ids.len());
        for record_id in &scope.record_ids {
            let record = self
                .commands
                .record(*record_id)
                .await
                .map_err(Failure::Node)?;
            if let Some(category) = record.as_ref().and_then(|r| r.category()) {
                tokens.push(token_id(record_id.as_uuid(), category.chain_bit()));
            }
        }
        Ok(Some((
            request_id,
            ConsentRegistry::GrantRequest {
                grantId: grant_id,
                patient: patient_address,
                grantee: doctor_address,
                categories,
                tokenIds: tokens,
                expiry: u64::try_from(expires_at.timestamp()).unwrap_or(0),
                eventId: eid,
            },
        )))
    }

    /// Records a grant's or a revoke's transaction (`ConsentGrantedOnChain`,
    /// `ConsentRevokedOnChain`).
    async fn record_consent(
        &self,
        request_id: AccessRequestId,
        revoked: bool,
        tx_hash: B256,
        block: u64,
    ) -> Result<(), Failure> {
        let registry = self.registry()?;
        self.commands
            .mark_consent_on_chain(
                request_id,
                revoked,
                self.receipt(*registry.address(), tx_hash, block),
            )
            .await
            .map_err(|e| Failure::Node(anyhow::anyhow!(e)))?;
        if revoked {
            tracing::info!(request_id = %request_id, tx = %tx_hash, "consent revoked on chain");
        } else {
            tracing::info!(request_id = %request_id, tx = %tx_hash, "consent granted on chain");
        }
        Ok(())
    }

    /// A revocation or expiry of a grant that is on chain.
    async fn revoke(&self, job: &Job) -> Result<(), Failure> {
        let (request_id, request) = self.access(job).await?;
        if request.revoked_on_chain().is_some() {
            return Ok(());
        }
        if request.granted_on_chain().is_none() {
            // The grant job comes first (log order); while it is queued, wait for it.
            // Once it is done without recording a grant, the registry decides: a grant
            // there (sent by a run that died before recording it) is recorded now and
            // revoked below; none means nothing to revoke.
            let pending = jobs::is_pending(self.store.any_pool(), WORKER, "grant", &job.subject)
                .await
                .map_err(Failure::Node)?;
            if pending {
                return Err(Failure::Wait(anyhow::anyhow!(
                    "waiting for the grant to reach the chain"
                )));
            }
            let registry = self.registry()?;
            let grant_id = event_id(request_id.as_uuid());
            let on_chain = registry
                .grants(grant_id)
                .call()
                .await
                .map_err(|e| Failure::Node(e.into()))?;
            if on_chain.patient == Address::ZERO {
                return Ok(());
            }
            let (tx_hash, block) = self
                .find(registry.ConsentGranted_filter().topic1(grant_id))
                .await?;
            self.record_consent(request_id, false, tx_hash, block)
                .await?;
        }
        let grant_id = event_id(request_id.as_uuid());
        let eid = self.origin(job)?;
        let registry = self.registry()?;
        let (tx_hash, block) = if registry
            .processed(eid)
            .call()
            .await
            .map_err(|e| Failure::Node(e.into()))?
        {
            self.find(registry.ConsentRevoked_filter().topic1(grant_id))
                .await?
        } else {
            self.confirmed(registry.revoke(grant_id, eid)).await?
        };
        self.record_consent(request_id, true, tx_hash, block).await
    }

    /// Publishes the Merkle root of a range of log ordinals.
    async fn anchor(&self, job: &Job) -> Result<(), Failure> {
        let Some((from, to)) = job
            .subject
            .split_once('-')
            .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
        else {
            return Err(Failure::Job("the anchor range is not valid".into()));
        };
        let address = self
            .chain
            .settings
            .audit_anchor
            .ok_or_else(|| Failure::Job("AFYA_AUDIT_ANCHOR_ADDRESS is not set".into()))?;
        let leaves: Vec<String> = sqlx::query_scalar(
            "SELECT leaf FROM chain_log_leaves WHERE ordinal >= $1 AND ordinal <= $2 \
             ORDER BY ordinal",
        )
        .bind(i64::try_from(from).unwrap_or(i64::MAX))
        .bind(i64::try_from(to).unwrap_or(i64::MAX))
        .fetch_all(self.store.any_pool())
        .await
        .map_err(|e| Failure::Node(e.into()))?;
        if leaves.len() as u64 != to - from + 1 {
            return Err(Failure::Job("the range's leaves are not all kept".into()));
        }
        let leaves: Vec<B256> = leaves
            .iter()
            .map(|l| B256::from_str(l))
            .collect::<Result<_, _>>()
            .map_err(|_| Failure::Job("a kept leaf is not 32 bytes".into()))?;
        let root = super::merkle::root(&leaves);
        let contract = super::AuditAnchor::new(address, self.chain.provider.clone());
        let next = contract
            .nextPosition()
            .call()
            .await
            .map_err(|e| Failure::Node(e.into()))?;
        let (tx_hash, block) = if next > to {
            // Anchored by an earlier run: its transaction.
            let found = contract
                .LogRangeAnchored_filter()
                .from_block(0)
                .query()
                .await
                .map_err(|e| Failure::Node(e.into()))?;
            let Some((event, log)) = found
                .into_iter()
                .find(|(e, _)| e.fromPosition == from && e.toPosition == to)
            else {
                return Err(Failure::Job("an overlapping range is anchored".into()));
            };
            if event.root != root {
                return Err(Failure::Job(
                    "the range is anchored with another root: the log differs from what was anchored".into(),
                ));
            }
            let block = log.block_number.unwrap_or_default();
            self.buried(block).await?;
            (log.transaction_hash.unwrap_or_default(), block)
        } else if next == from {
            self.confirmed(contract.anchor(root, from, to)).await?
        } else {
            return Err(Failure::Wait(anyhow::anyhow!(
                "waiting for the ranges before {from} (the chain is at {next})"
            )));
        };
        self.commands
            .record_anchor(
                from,
                to,
                root.to_string(),
                self.receipt(address, tx_hash, block),
            )
            .await
            .map_err(|e| Failure::Node(anyhow::anyhow!(e)))?;
        tracing::info!(from, to, tx = %tx_hash, "log range anchored on chain");
        Ok(())
    }

    fn origin(&self, job: &Job) -> Result<B256, Failure> {
        uuid::Uuid::parse_str(job.event_id.as_deref().unwrap_or_default())
            .map(event_id)
            .map_err(|_| Failure::Job("the job's event id is not valid".into()))
    }

    /// The transaction of an effect already on chain (done by an earlier run).
    async fn find<E: alloy::sol_types::SolEvent>(
        &self,
        filter: alloy::contract::Event<&alloy::providers::DynProvider, E>,
    ) -> Result<(B256, u64), Failure> {
        let found = filter
            .from_block(0)
            .query()
            .await
            .map_err(|e| Failure::Node(e.into()))?;
        let Some((_, log)) = found.into_iter().next() else {
            return Err(Failure::Job(
                "the event was processed on chain but its effect is not found".into(),
            ));
        };
        let block = log.block_number.unwrap_or_default();
        // Seen at the head, it may still be reorganised away: confirmed like a new one.
        self.buried(block).await?;
        Ok((log.transaction_hash.unwrap_or_default(), block))
    }
}

/// A failed estimate: the node saying the call would revert (JSON-RPC code 3, or a
/// message naming a revert or the paymaster) is the job's fault; anything else, the
/// node's.
fn estimate_failure(error: alloy::transports::TransportError) -> Failure {
    match error {
        alloy::transports::RpcError::ErrorResp(payload)
            if payload.code == 3 || {
                let message = payload.message.to_ascii_lowercase();
                message.contains("revert") || message.contains("paymaster")
            } =>
        {
            Failure::Job(one_line(&format!(
                "the call would fail: {} (code {})",
                payload.message, payload.code
            )))
        }
        other => Failure::Node(other.into()),
    }
}

/// The writer actor.
pub type ChainWriter = WorkerActor<Writer>;

pub use eventstore::work::Stop;

#[async_trait(?Send)]
impl work::Worker for Writer {
    fn name(&self) -> &'static str {
        LOCK_NAME
    }

    async fn activate(&self) -> anyhow::Result<()> {
        // The work list of versions before the shared job queue.
        jobs::adopt(
            self.store.any_pool(),
            self.store.backend(),
            "chain_jobs",
            "SELECT 'chain', kind, subject, event_id, NULL, position, state, \
             attempts, next_attempt_at, last_error, updated_at FROM chain_jobs",
        )
        .await?;
        tracing::info!(
            chain_id = self.chain.settings.chain_id,
            "chain writer active"
        );
        self.state.lock().await.checked = false;
        Ok(())
    }

    async fn round(&self, round: &work::Round) -> anyhow::Result<Outcome> {
        Writer::round(self, round).await
    }
}

/// Starts the chain writer; `wake` follows the `chain_intake` consumer.
pub fn start(
    store: Store,
    commands: Arc<Commands>,
    chain: Chain,
    wake: Option<watch::Receiver<LogCursor>>,
) -> anyhow::Result<Addr<ChainWriter>> {
    let token = chain
        .settings
        .record_token
        .context("AFYA_RECORD_TOKEN_ADDRESS must be set for the chain adapter")?;
    let poll = chain.settings.poll;
    let registry = chain.settings.consent_registry;
    let writer = Writer {
        store: store.clone(),
        commands,
        chain,
        token,
        registry,
        max_attempts: 10,
        state: Mutex::new(State {
            checked: false,
            pause: MIN_PAUSE,
        }),
    };
    Ok(WorkerActor::launch(writer, store, poll, wake))
}
