//! The `afyachain` command line.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use eventstore::{LogCursor, Runner};

use crate::app::{open, App};
use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "afyachain",
    version,
    about = "Patient-controlled medical records"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server and the projections (no configuration needed).
    Serve,
    /// Manage projections.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Read the global event log.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Manage staff: registrars (verify doctors) and auditors.
    Staff {
        #[command(subcommand)]
        command: StaffCommand,
    },
    /// Integrators: systems that receive events through an API key.
    Integrator {
        #[command(subcommand)]
        command: IntegratorCommand,
    },
    /// Log consumers: projections and the storage replicator with its dead letters.
    Consumers {
        #[command(subcommand)]
        command: ConsumersCommand,
    },
    /// The chain: deploy the contracts.
    Chain {
        #[command(subcommand)]
        command: ChainCommand,
    },
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Recompute the Merkle roots of the anchored log ranges overlapping ordinals
    /// FROM..=TO (1-based, in log order) from the local log and compare them with the
    /// chain. Exits non-zero on any difference, or when nothing there is anchored.
    Verify {
        #[arg(long)]
        from: u64,
        #[arg(long)]
        to: u64,
    },
}

#[derive(Subcommand)]
enum ChainCommand {
    /// Deploy the record token, consent registry, audit anchor and paymaster with the
    /// operator key (AFYA_CHAIN_RPC_URL, AFYA_CHAIN_ID, ZKSYNC_PRIVATE_KEY) and print
    /// their addresses as NAME=0x… lines, ready to export.
    Deploy,
}

#[derive(Subcommand)]
enum ConsumersCommand {
    /// Show every consumer's checkpoint and lag, the jobs every worker has waiting
    /// (blobs to copy, chain transactions, M-Pesa pushes), the dead-letter list and
    /// the webhooks' parked deliveries.
    Status,
    /// Requeue dead letters (for `webhooks`: mark parked deliveries for replay). Takes
    /// effect in a running server at its next round.
    Retry {
        /// Which worker's dead letters: `storage`, `chain`, `mpesa` or `webhooks`.
        consumer: String,
        /// Only these subjects (a record id for `storage`, a payment id for `mpesa`, a
        /// webhook id for `webhooks`; repeatable); all of the worker's dead letters if
        /// none is given.
        #[arg(long = "record")]
        records: Vec<String>,
    },
}

#[derive(Subcommand)]
enum StaffCommand {
    /// Create a registrar or an auditor. The password is read from standard input (its
    /// first line), never from the command line. Prints the new staff id.
    Add {
        /// registrar or auditor
        #[arg(long)]
        role: String,
        /// Kenyan mobile number they sign in with.
        #[arg(long)]
        phone: String,
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand)]
enum IntegratorCommand {
    /// Add an integrator whose key may receive the given event types. Prints the
    /// integrator id, then the API key as the last line (shown once: keep it).
    Add {
        /// The integrator's (organisation's) name.
        #[arg(long)]
        name: String,
        /// Comma-separated event types the key may receive, or `all`.
        #[arg(long)]
        events: String,
    },
    /// Withdraw an integrator's key for good: it is refused from then on, its open
    /// streams end and its webhooks stop.
    Disable {
        /// The integrator id `add` printed.
        #[arg(long)]
        id: String,
    },
}

#[derive(Subcommand)]
enum ProjectionsCommand {
    /// List projections with their checkpoints.
    List,
    /// Empty a projection's read models and replay the log from position 0.
    /// The projection must not be running in a server at the same time.
    Rebuild {
        /// A projection name, or `all`.
        name: String,
    },
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Print events as JSON lines, in log order, from a position.
    Tail {
        /// First position to print (0: the whole log).
        #[arg(long, default_value_t = 0)]
        from: i64,
        /// Keep printing new events as they are committed.
        #[arg(long)]
        follow: bool,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::telemetry::init();
    let result = actix_rt::System::new().block_on(run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("afyachain: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::from_env()?;
    match cli.command {
        Command::Serve => {
            let listener = std::net::TcpListener::bind(config.listen)
                .with_context(|| format!("binding {}", config.listen))?;
            let app = App::start(config).await?;
            crate::server::run(app, listener).await
        }
        Command::Projections { command } => {
            let (store, _commands, _storage) = open(&config).await?;
            let result = projections_command(&store, command).await;
            store.close().await;
            result
        }
        Command::Staff {
            command: StaffCommand::Add { role, phone, name },
        } => {
            let (store, commands, _storage) = open(&config).await?;
            let result = add_staff(&commands, &role, &phone, &name).await;
            store.close().await;
            result
        }
        Command::Integrator {
            command: IntegratorCommand::Add { name, events },
        } => {
            let (store, commands, _storage) = open(&config).await?;
            let result = add_integrator(&commands, &name, &events).await;
            store.close().await;
            result
        }
        Command::Integrator {
            command: IntegratorCommand::Disable { id },
        } => {
            let id = domain::ids::IntegratorId::parse(id.trim())
                .map_err(|_| anyhow::anyhow!("--id must be an integrator id (a UUID)"))?;
            let (store, commands, _storage) = open(&config).await?;
            let result = commands
                .disable_integrator(id, eventstore::CommandMeta::new("operator:cli"))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"));
            store.close().await;
            result.map(|_| println!("{id}: key withdrawn"))
        }
        Command::Chain {
            command: ChainCommand::Deploy,
        } => {
            let settings = config.chain.clone().context(
                "set AFYA_CHAIN_RPC_URL, AFYA_CHAIN_ID and ZKSYNC_PRIVATE_KEY to deploy",
            )?;
            let chain = chain_adapter::chain::Chain::connect(settings).await?;
            chain.check_chain_id().await?;
            for (name, address) in chain.deploy().await? {
                println!("{name}={address}");
            }
            Ok(())
        }
        Command::Audit {
            command: AuditCommand::Verify { from, to },
        } => {
            let settings = config.chain.clone().context(
                "set AFYA_CHAIN_RPC_URL, AFYA_CHAIN_ID and ZKSYNC_PRIVATE_KEY to verify",
            )?;
            let anchor = settings
                .audit_anchor
                .context("set AFYA_AUDIT_ANCHOR_ADDRESS to verify")?;
            if from == 0 || to < from {
                anyhow::bail!("--from must be at least 1 and --to at least --from");
            }
            let chain = chain_adapter::chain::Chain::connect(settings).await?;
            let (store, _commands, _storage) = open(&config).await?;
            let checked =
                chain_adapter::chain::verify::verify(&store, &chain, anchor, from, to).await;
            store.close().await;
            let checked = checked?;
            if checked.is_empty() {
                anyhow::bail!("no anchored range overlaps {from}..={to}");
            }
            let mut bad = 0;
            for c in &checked {
                match c.local {
                    Some(local) if c.matches() => {
                        println!("ok        {}..={} root {local}", c.from, c.to)
                    }
                    Some(local) => {
                        bad += 1;
                        println!(
                            "MISMATCH  {}..={} chain {} local {local}",
                            c.from, c.to, c.on_chain
                        )
                    }
                    None => {
                        bad += 1;
                        println!("MISSING   {}..={}: the local log is shorter", c.from, c.to)
                    }
                }
            }
            if bad > 0 {
                anyhow::bail!("{bad} anchored range(s) do not match the local log");
            }
            Ok(())
        }
        Command::Consumers { command } => {
            let (store, _commands, storage) = open(&config).await?;
            let result = consumers_command(&store, &storage, command).await;
            store.close().await;
            result
        }
        Command::Events {
            command: EventsCommand::Tail { from, follow },
        } => {
            let (store, _commands, _storage) = open(&config).await?;
            let result = tail(&store, from, follow).await;
            store.close().await;
            result
        }
    }
}

async fn projections_command(
    store: &eventstore::Store,
    command: ProjectionsCommand,
) -> anyhow::Result<()> {
    let all = projections::all();
    match command {
        ProjectionsCommand::List => {
            for projection in all {
                let runner = Runner::new(store.clone(), projection).await?;
                let c = runner.cursor();
                println!("{}\tposition {}\ttx {}", runner.name(), c.position, c.tx);
            }
            Ok(())
        }
        ProjectionsCommand::Rebuild { name } => {
            let chosen: Vec<_> = all
                .into_iter()
                .filter(|p| name == "all" || p.name() == name)
                .collect();
            if chosen.is_empty() {
                let names: Vec<String> = projections::all()
                    .iter()
                    .map(|p| p.name().to_owned())
                    .collect();
                anyhow::bail!("no projection named {name}; known: {}", names.join(", "));
            }
            if chosen.iter().any(|p| p.name() == "audit_trail") {
                // A rebuild re-chains the log as it is now: refuse while the trail
                // shows tampering, or the rebuild would launder it.
                let report = projections::audit::verify(store, 1, None).await?;
                if !report.intact {
                    anyhow::bail!(
                        "the audit trail does not verify ({} problems, the first at ordinal {}); \
                         rebuilding it would re-chain a tampered log. Investigate with \
                         GET /v1/audit/verify first",
                        report.problems_total,
                        report.problems.first().map_or(0, |p| p.ordinal)
                    );
                }
            }
            for projection in chosen {
                let mut runner = Runner::new(store.clone(), projection).await?;
                let applied = runner.rebuild().await?;
                runner.unlock().await;
                println!("{}: rebuilt from {} events", runner.name(), applied);
            }
            Ok(())
        }
    }
}

async fn consumers_command(
    store: &eventstore::Store,
    storage: &chain_adapter::storage::Storage,
    command: ConsumersCommand,
) -> anyhow::Result<()> {
    use eventstore::jobs;
    let pool = store.any_pool();
    match command {
        ConsumersCommand::Status => {
            let end = store.log_end().await?;
            println!("log: last position {}", end.position);
            println!("consumers:");
            for checkpoint in eventstore::consumer::checkpoints(pool).await? {
                println!(
                    "  {:<20} position {:<10} behind {:<8} updated {}",
                    checkpoint.name,
                    checkpoint.position,
                    (end.position - checkpoint.position).max(0),
                    checkpoint.updated_at
                );
            }
            match storage.backend() {
                None => {
                    println!("storage: local only (AFYA_BLOB_STORE=local); nothing to replicate")
                }
                Some(backend) => {
                    let remote = storage
                        .remote_state()
                        .await
                        .map(|s| s.as_str())
                        .unwrap_or("unknown");
                    println!("storage: {backend}, remote {remote}");
                }
            }
            let counts = jobs::counts(pool).await?;
            if counts.is_empty() {
                println!("jobs: none waiting");
            } else {
                println!("jobs (worker, kind, state, how many):");
                for count in counts {
                    println!(
                        "  {:<8} {:<28} {:<8} {}",
                        count.worker, count.kind, count.state, count.jobs
                    );
                }
            }
            let parked = integrations::webhook::parked_counts(pool).await?;
            if parked.is_empty() {
                println!("webhook deliveries parked: none");
            } else {
                println!("webhook deliveries parked (webhook, how many):");
                let delivering = delivering_webhooks(pool).await?;
                let mut parked: Vec<_> = parked.into_iter().collect();
                parked.sort();
                for (webhook, n) in parked {
                    if delivering.contains(&webhook) {
                        println!("  webhook:{webhook} {n}");
                    } else {
                        println!("  webhook:{webhook} {n} (its key withdrawn: never replayed)");
                    }
                }
            }
            let troubled = jobs::troubled(pool, 100).await?;
            if troubled.is_empty() {
                println!("dead letters: none");
            } else {
                println!("dead letters and failing jobs:");
                for job in troubled {
                    println!(
                        "  {} {} {} {} attempts {} updated {}: {}",
                        job.worker,
                        job.kind,
                        job.subject,
                        job.state,
                        job.attempts,
                        job.updated_at,
                        job.last_error.unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
        ConsumersCommand::Retry { consumer, records } if consumer == "webhooks" => {
            // Only webhooks that deliver: nothing would replay the others' deliveries.
            let delivering = delivering_webhooks(pool).await?;
            let mut webhooks = std::collections::BTreeSet::new();
            for raw in &records {
                let raw = raw.trim();
                let id = uuid::Uuid::parse_str(raw)
                    .map_err(|_| anyhow::anyhow!("{raw} is not a webhook id"))?;
                if !delivering.contains(&id) {
                    anyhow::bail!("no webhook {id} delivers here (unknown, or its key withdrawn)");
                }
                webhooks.insert(id);
            }
            if webhooks.is_empty() {
                webhooks = integrations::webhook::parked_counts(pool)
                    .await?
                    .into_keys()
                    .filter(|id| delivering.contains(id))
                    .collect();
            }
            let mut marked = 0;
            for webhook in &webhooks {
                marked += integrations::webhook::request_replay(pool, *webhook).await?;
            }
            if marked == 0 {
                println!("no parked webhook deliveries to replay");
            } else {
                // A running server's deliverers take them at their next poll.
                println!(
                    "marked {marked} parked deliveries of {} webhook(s) for replay",
                    webhooks.len()
                );
            }
            Ok(())
        }
        ConsumersCommand::Retry { consumer, records } => {
            const WORKERS: [&str; 3] = [
                chain_adapter::storage::queue::WORKER,
                chain_adapter::chain::minter::WORKER,
                mpesa_adapter::worker::WORKER,
            ];
            let Some(worker) = WORKERS.into_iter().find(|w| *w == consumer) else {
                anyhow::bail!(
                    "no worker with dead letters named {consumer}; known: {}, webhooks",
                    WORKERS.join(", ")
                );
            };
            let mut subjects = Vec::with_capacity(records.len());
            for raw in &records {
                let raw = raw.trim();
                let subject = match worker {
                    "storage" => domain::ids::RecordId::parse(raw)
                        .map(|id| id.to_string())
                        .map_err(|_| anyhow::anyhow!("{raw} is not a record id"))?,
                    "mpesa" => domain::ids::PaymentId::parse(raw)
                        .map(|id| id.to_string())
                        .map_err(|_| anyhow::anyhow!("{raw} is not a payment id"))?,
                    // A record, an access request, or a range of the log (`from-to`).
                    _ => raw.to_owned(),
                };
                subjects.push(subject);
            }
            let requeued = jobs::retry(pool, worker, &subjects).await?;
            println!("requeued {requeued} dead letter(s)");
            Ok(())
        }
    }
}

/// The webhooks that deliver (their integrator's key not withdrawn).
async fn delivering_webhooks(
    pool: &sqlx::AnyPool,
) -> anyhow::Result<std::collections::BTreeSet<uuid::Uuid>> {
    Ok(projections::read_models::webhooks::webhooks(pool)
        .await?
        .iter()
        .filter_map(|w| uuid::Uuid::parse_str(&w.webhook_id).ok())
        .collect())
}

async fn add_staff(
    commands: &commands::Commands,
    role: &str,
    phone: &str,
    name: &str,
) -> anyhow::Result<()> {
    use domain::value::{Msisdn, Password, PersonName, StaffRole};
    let role = StaffRole::parse(role)?;
    let phone = Msisdn::parse(phone)?;
    let name = PersonName::parse(name)?;
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let password = Password::parse(line.trim_end_matches(['\r', '\n']))?;
    let meta = eventstore::CommandMeta::new("operator:cli");
    let done = commands
        .register_staff(
            commands::RegisterStaff {
                role,
                name: &name,
                phone: &phone,
                password: &password,
            },
            meta,
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{}", done.id);
    Ok(())
}

async fn add_integrator(
    commands: &commands::Commands,
    name: &str,
    events: &str,
) -> anyhow::Result<()> {
    let name = domain::value::PersonName::parse(name)
        .map_err(|_| anyhow::anyhow!("--name must be 1 to 100 characters"))?;
    let types = crate::routes::events::parse_types(events, integrations::event_types())
        .map_err(|e| anyhow::anyhow!("--events: {e}"))?;
    let meta = eventstore::CommandMeta::new("operator:cli");
    let (id, key) = commands
        .add_integrator(name.as_str(), types, meta)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{id}");
    println!("{key}");
    Ok(())
}

async fn tail(store: &eventstore::Store, from: i64, follow: bool) -> anyhow::Result<()> {
    let mut cursor: LogCursor = store.cursor_at_position(from).await?;
    let mut wake = store.notifier().subscribe();
    let stdout = std::io::stdout();
    loop {
        let events = store.read_log(cursor, 1000).await?;
        if events.is_empty() {
            if !follow {
                if store.log_held_back(cursor).await? {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                return Ok(());
            }
            // Woken by commits (LISTEN on PostgreSQL); a slow tick covers the rest.
            tokio::select! {
                _ = wake.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
            continue;
        }
        let mut out = stdout.lock();
        for event in &events {
            serde_json::to_writer(&mut out, event)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        if let Some(last) = events.last() {
            cursor = last.cursor();
        }
    }
}
