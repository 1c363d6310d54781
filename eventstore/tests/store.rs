#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
//! The store suite, run on both backends: appends, idempotency, conflicts, the global
//! log, checkpointed consumers and their locks.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eventstore::testing::{TestStore, BACKENDS};
use eventstore::{
    Backend, CommandMeta, ConsumerActor, ConsumerLock, ExecuteError, LogCursor, Runner, Store,
    StoreConfig,
};
use support::{Counter, CounterCommand, Recorder};

async fn add(store: &Store, id: &str, n: u64, meta: CommandMeta) -> eventstore::CommandOutcome {
    let events = store.aggregate_store::<Counter>(vec![]);
    store
        .execute::<Counter>(&events, id, CounterCommand::Add { n }, &(), &meta)
        .await
        .unwrap()
}

#[actix_rt::test]
async fn appended_events_get_position_id_time_and_metadata_in_the_log() {
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        let meta = CommandMeta::new("patient:abc");
        let outcome = add(&t.store, "c1", 2, meta.clone()).await;
        assert_eq!(outcome.sequences, Some((1, 1)));
        let events = t.store.aggregate_store::<Counter>(vec![]);
        t.store
            .execute::<Counter>(
                &events,
                "c1",
                CounterCommand::AddTwice { n: 3 },
                &(),
                &CommandMeta::new("patient:abc"),
            )
            .await
            .unwrap();
        let log = read_settled(&t.store, LogCursor::START, 100).await.unwrap();
        assert_eq!(log.len(), 3, "{backend:?}");
        assert!(log.windows(2).all(|w| w[0].cursor() < w[1].cursor()));
        assert_eq!(log[0].aggregate_id, "c1");
        assert_eq!(log[0].meta("actor"), Some("patient:abc"));
        assert_eq!(
            log[0].meta("command_id"),
            Some(meta.command_id.to_string().as_str())
        );
        assert_eq!(
            log[0].meta("correlation_id"),
            Some(meta.correlation_id.to_string().as_str())
        );
        assert_ne!(log[0].event_id, log[1].event_id);
        assert_eq!(log[0].event_id.get_version_num(), 4);
        let age = chrono::Utc::now() - log[2].recorded_at;
        assert!(
            age.num_seconds().abs() < 60,
            "{backend:?} recorded_at {}",
            log[2].recorded_at
        );
        assert_eq!(log[2].payload["Added"]["total"], 8);
        // Reading from a cursor yields exactly what follows it.
        let rest = read_settled(&t.store, log[0].cursor(), 100).await.unwrap();
        assert_eq!(rest, log[1..].to_vec());
        // cursor_at_position(p) starts at the event with position p.
        let from = t.store.cursor_at_position(log[1].position).await.unwrap();
        assert_eq!(
            read_settled(&t.store, from, 100).await.unwrap(),
            log[1..].to_vec()
        );
        let decoded: support::CounterEvent = log[1].decode(&[]).unwrap();
        assert_eq!(decoded, support::CounterEvent::Added { n: 3, total: 5 });
        t.cleanup().await.unwrap();
    }
}

#[actix_rt::test]
async fn a_repeated_idempotency_key_appends_once_and_returns_the_first_outcome() {
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        let first = add(
            &t.store,
            "c1",
            1,
            CommandMeta::new("a").with_idempotency_key("k-1"),
        )
        .await;
        assert!(!first.replayed);
        // A retry (new command id, same key) and even a different aggregate: no append.
        let again = add(
            &t.store,
            "c1",
            1,
            CommandMeta::new("a").with_idempotency_key("k-1"),
        )
        .await;
        assert!(again.replayed);
        assert_eq!(again.sequences, first.sequences);
        assert_eq!(again.aggregate_id, "c1");
        let log = read_settled(&t.store, LogCursor::START, 100).await.unwrap();
        assert_eq!(log.len(), 1, "{backend:?}");

        // Concurrent retries with one key: exactly one append.
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let store = t.store.clone();
            tasks.push(tokio::spawn(async move {
                add(
                    &store,
                    "c2",
                    5,
                    CommandMeta::new("a").with_idempotency_key("k-2"),
                )
                .await
            }));
        }
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.unwrap());
        }
        assert_eq!(
            outcomes.iter().filter(|o| !o.replayed).count(),
            1,
            "{backend:?}"
        );
        assert!(outcomes.iter().all(|o| o.sequences == Some((1, 1))));
        let log = read_settled(&t.store, LogCursor::START, 100).await.unwrap();
        assert_eq!(
            log.iter().filter(|e| e.aggregate_id == "c2").count(),
            1,
            "{backend:?}"
        );
        t.cleanup().await.unwrap();
    }
}

#[actix_rt::test]
async fn a_key_reused_for_a_different_request_is_refused_and_appends_nothing() {
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        let meta = |fingerprint: &str| {
            CommandMeta::new("a")
                .with_idempotency_key("k-f")
                .with_fingerprint(fingerprint)
        };
        let first = add(&t.store, "c1", 1, meta("request-1")).await;
        assert!(!first.replayed);
        // The same request again: the first outcome.
        assert!(add(&t.store, "c1", 1, meta("request-1")).await.replayed);
        // Another request under the same key: refused, nothing appended.
        let events = t.store.aggregate_store::<Counter>(vec![]);
        let refused = t
            .store
            .execute::<Counter>(
                &events,
                "c1",
                CounterCommand::Add { n: 7 },
                &(),
                &meta("request-2"),
            )
            .await;
        assert!(
            matches!(refused, Err(ExecuteError::KeyReused)),
            "{backend:?}: {refused:?}"
        );
        let stored = t.store.idempotent_outcome("k-f").await.unwrap().unwrap();
        assert_eq!(stored.1.as_deref(), Some("request-1"));
        let log = read_settled(&t.store, LogCursor::START, 100).await.unwrap();
        assert_eq!(log.len(), 1, "{backend:?}");
        // The fingerprint is kept beside the key, never in the immutable log.
        assert_eq!(log[0].meta("request_fingerprint"), None, "{backend:?}");
        assert!(log[0].meta("idempotency_key").is_some());

        // Keys expire after a while: young ones stay...
        let kept = t
            .store
            .expire_idempotency_keys(Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(kept, 0, "{backend:?}");
        // ...old ones go, fingerprint and all: the key used again is a new command.
        let expired = t
            .store
            .expire_idempotency_keys(Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(expired, 1, "{backend:?}");
        assert!(t.store.idempotent_outcome("k-f").await.unwrap().is_none());
        assert!(!add(&t.store, "c1", 7, meta("request-2")).await.replayed);
        let log = read_settled(&t.store, LogCursor::START, 100).await.unwrap();
        assert_eq!(log.len(), 2, "{backend:?}");
        t.cleanup().await.unwrap();
    }
}

#[actix_rt::test]
async fn concurrent_commands_on_one_aggregate_are_all_appended_in_sequence() {
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let store = t.store.clone();
            tasks.push(tokio::spawn(async move {
                let events = store.aggregate_store::<Counter>(vec![]);
                let mut done = 0;
                for _ in 0..5 {
                    match store
                        .execute::<Counter>(
                            &events,
                            "shared",
                            CounterCommand::Add { n: 1 },
                            &(),
                            &CommandMeta::new("a"),
                        )
                        .await
                    {
                        Ok(_) => done += 1,
                        Err(ExecuteError::Conflict) => {}
                        Err(e) => panic!("{e:#}"),
                    }
                }
                done
            }));
        }
        let mut appended = 0;
        for task in tasks {
            appended += task.await.unwrap();
        }
        let log = read_settled(&t.store, LogCursor::START, 1000)
            .await
            .unwrap();
        assert_eq!(
            log.len(),
            appended,
            "{backend:?}: every success appended, nothing lost"
        );
        let seqs: Vec<i64> = log.iter().map(|e| e.sequence).collect();
        assert_eq!(seqs, (1..=appended as i64).collect::<Vec<_>>());
        let totals: Vec<u64> = log
            .iter()
            .map(|e| e.payload["Added"]["total"].as_u64().unwrap())
            .collect();
        assert_eq!(
            totals,
            (1..=appended as u64).collect::<Vec<_>>(),
            "no lost update"
        );
        t.cleanup().await.unwrap();
    }
}

#[actix_rt::test]
async fn a_refused_command_appends_nothing() {
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        let events = t.store.aggregate_store::<Counter>(vec![]);
        let result = t
            .store
            .execute::<Counter>(
                &events,
                "c",
                CounterCommand::Refuse,
                &(),
                &CommandMeta::new("a").with_idempotency_key("k"),
            )
            .await;
        assert!(matches!(
            result,
            Err(ExecuteError::Rejected(support::Refused))
        ));
        assert!(t
            .store
            .read_log(LogCursor::START, 10)
            .await
            .unwrap()
            .is_empty());
        assert!(t.store.idempotent_outcome("k").await.unwrap().is_none());
        t.cleanup().await.unwrap();
    }
}

/// docs/architecture.md rule 3: with many concurrent writers, some holding their transaction open
/// after taking a position, a tailing consumer sees every event exactly once, in an
/// order consistent with each aggregate's sequence.
#[actix_rt::test]
async fn a_tailing_consumer_sees_every_event_once_under_concurrent_writers() {
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        const WRITERS: usize = 8;
        let per_writer: usize = if backend == Backend::Postgres {
            400
        } else {
            150
        };
        let recorder = Recorder::new("tail");
        let mut runner = Runner::new(t.store.clone(), recorder.clone())
            .await
            .unwrap()
            .with_batch_size(50);
        assert!(runner.try_lock().await.unwrap());

        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let store = t.store.clone();
            writers.push(tokio::spawn(async move {
                let events = store.aggregate_store::<Counter>(vec![]);
                for i in 0..per_writer {
                    // Each writer has its own aggregates, so no conflicts: pure concurrency.
                    let id = format!("w{w}-{}", i % 10);
                    if backend == Backend::Postgres && i % 25 == 0 {
                        slow_append(&store, &id).await;
                    } else {
                        store
                            .execute::<Counter>(
                                &events,
                                &id,
                                CounterCommand::Add { n: 1 },
                                &(),
                                &CommandMeta::new("w"),
                            )
                            .await
                            .unwrap();
                    }
                }
            }));
        }
        let total = WRITERS * per_writer;
        let tail = async {
            let mut idle = 0;
            loop {
                let n = runner.step().await.unwrap();
                if recorder.seen().len() >= total {
                    break;
                }
                if n == 0 {
                    idle += 1;
                    assert!(
                        idle < 20_000,
                        "consumer stalled at {}",
                        recorder.seen().len()
                    );
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        };
        tail.await;
        for w in writers {
            w.await.unwrap();
        }
        runner.drain().await.unwrap();
        let seen = recorder.seen();
        assert_eq!(seen.len(), total, "{backend:?}: every event exactly once");
        let mut positions: Vec<i64> = seen.iter().map(|e| e.position).collect();
        positions.sort_unstable();
        positions.dedup();
        assert_eq!(positions.len(), total, "no duplicates");
        let mut last_seq: HashMap<String, i64> = HashMap::new();
        for e in &seen {
            let prev = last_seq
                .insert(e.aggregate_id.clone(), e.sequence)
                .unwrap_or(0);
            assert_eq!(
                e.sequence,
                prev + 1,
                "{backend:?}: per-aggregate order for {}",
                e.aggregate_id
            );
        }
        if backend == Backend::Postgres {
            // The race was real: some events committed after a higher position was
            // already in the log, and the consumer still did not skip them.
            let inversions = seen
                .windows(2)
                .filter(|w| w[1].position < w[0].position)
                .count();
            assert!(
                inversions > 0,
                "the test did not produce out-of-order commits"
            );
            eprintln!("{inversions} out-of-position-order commits delivered without loss");
        }
        // The checkpoint table agrees with the runner.
        let stored: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", recorder.table()))
            .fetch_one(t.store.any_pool())
            .await
            .unwrap();
        assert_eq!(stored as usize, total);
        drop(runner);
        t.cleanup().await.unwrap();
    }
}

/// An append that takes its position early and commits late, like a slow client.
async fn slow_append(store: &Store, id: &str) {
    let pool = store.pg_pool().unwrap();
    loop {
        let mut tx = pool.begin().await.unwrap();
        let next: i64 = sqlx::query_scalar(
            "SELECT coalesce(max(sequence), 0) + 1 FROM events WHERE aggregate_type = 'counter' AND aggregate_id = $1",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        let inserted = sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
             VALUES ('counter', $1, $2, 'Added', '1.0', json_build_object('Added', json_build_object('n', 1, 'total', $2)), '{}'::json)",
        )
        .bind(id)
        .bind(next)
        .execute(&mut *tx)
        .await;
        if inserted.is_err() {
            tx.rollback().await.ok();
            continue;
        }
        sqlx::query("SELECT pg_sleep(0.03)")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        store.notifier().committed();
        return;
    }
}

#[actix_rt::test]
async fn a_consumer_resumes_from_its_checkpoint_and_holds_its_lock() {
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        for i in 0..5 {
            add(&t.store, &format!("c{i}"), 1, CommandMeta::new("a")).await;
        }
        let recorder = Recorder::new("resume");
        let mut first = Runner::new(t.store.clone(), recorder.clone())
            .await
            .unwrap();
        assert!(first.try_lock().await.unwrap());
        // A second instance of the same consumer stays on standby.
        let mut second = Runner::new(t.store.clone(), recorder.clone())
            .await
            .unwrap();
        assert!(
            !second.try_lock().await.unwrap(),
            "{backend:?}: lock is exclusive"
        );
        assert_eq!(first.drain().await.unwrap(), 5);
        first.unlock().await;
        drop(first);

        for i in 5..8 {
            add(&t.store, &format!("c{i}"), 1, CommandMeta::new("a")).await;
        }
        // The standby takes over from the stored checkpoint: only the new events.
        assert!(second.try_lock().await.unwrap());
        assert_eq!(second.drain().await.unwrap(), 3, "{backend:?}");
        assert_eq!(recorder.seen().len(), 8);

        // Rebuild from 0 replays everything into emptied tables.
        recorder.seen.lock().unwrap().clear();
        assert_eq!(second.rebuild().await.unwrap(), 8);
        let stored: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", recorder.table()))
            .fetch_one(t.store.any_pool())
            .await
            .unwrap();
        assert_eq!(stored, 8);
        second.unlock().await;
        drop(second);
        t.cleanup().await.unwrap();
    }
}

#[actix_rt::test]
async fn a_consumer_actor_is_woken_by_a_commit_and_checkpoints_on_stop() {
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        let recorder = Recorder::new("actor");
        let handle = spawn_without_tick(&t.store, recorder.clone()).await;
        let outcome = add(&t.store, "c1", 1, CommandMeta::new("a")).await;
        let target = t
            .store
            .cursor_of("counter", "c1", outcome.sequences.unwrap().1)
            .await
            .unwrap()
            .unwrap();
        // With no safety tick, only the commit signal can have woken it.
        assert!(
            handle.wait_for(target, Duration::from_secs(30)).await,
            "{backend:?}"
        );
        assert_eq!(recorder.seen().len(), 1);
        let status = handle.status().await.unwrap();
        assert!(status.active);
        assert_eq!(status.cursor, target);
        handle.stop().await;
        let stored: (i64, i64) =
            sqlx::query_as("SELECT tx, position FROM consumer_checkpoints WHERE name = 'actor'")
                .fetch_one(t.store.any_pool())
                .await
                .unwrap();
        assert_eq!(stored, (target.tx, target.position));
        t.cleanup().await.unwrap();
    }
}

/// The log cursor of the last event `outcome` appended to counter `id`.
async fn cursor_after(store: &Store, id: &str, outcome: &eventstore::CommandOutcome) -> LogCursor {
    store
        .cursor_of("counter", id, outcome.sequences.unwrap().1)
        .await
        .unwrap()
        .unwrap()
}

/// A consumer started while another instance is active stands by; when the active one
/// stops, it takes the lock on its poll and goes on from the stored checkpoint, so
/// every event is applied once.
#[actix_rt::test]
async fn a_standby_consumer_takes_over_when_the_active_one_stops() {
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        let recorder = Recorder::new("takeover");
        let first = ConsumerActor::spawn(t.store.clone(), recorder.clone())
            .await
            .unwrap();
        // The lock was free: taken before `spawn` returned.
        assert!(first.status().await.unwrap().active, "{backend:?}");
        let second = ConsumerActor::spawn(t.store.clone(), recorder.clone())
            .await
            .unwrap();
        assert!(!second.status().await.unwrap().active, "{backend:?}");

        let outcome = add(&t.store, "t1", 1, CommandMeta::new("a")).await;
        let target = cursor_after(&t.store, "t1", &outcome).await;
        assert!(first.wait_for(target, Duration::from_secs(30)).await);
        first.stop().await;

        let outcome = add(&t.store, "t2", 1, CommandMeta::new("a")).await;
        let target = cursor_after(&t.store, "t2", &outcome).await;
        assert!(
            second.wait_for(target, Duration::from_secs(30)).await,
            "{backend:?}: the standby took over"
        );
        assert!(second.status().await.unwrap().active);
        let ids: Vec<String> = recorder
            .seen()
            .iter()
            .map(|e| e.aggregate_id.clone())
            .collect();
        assert_eq!(ids, vec!["t1", "t2"], "{backend:?}: each event once");
        second.stop().await;
        t.cleanup().await.unwrap();
    }
}

/// A stop that comes while a batch is applied waits for that batch to commit its
/// checkpoint, and no batch starts after it; meanwhile the consumer's status is
/// answered at once.
#[actix_rt::test]
async fn stopping_a_consumer_lets_the_batch_in_flight_commit_and_starts_no_other() {
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        let first = add(&t.store, "g1", 1, CommandMeta::new("a")).await;
        let first = cursor_after(&t.store, "g1", &first).await;
        add(&t.store, "g2", 1, CommandMeta::new("a")).await;
        let gate = Gate::new("gate", true);
        let runner = Runner::new(t.store.clone(), gate.clone())
            .await
            .unwrap()
            .with_batch_size(1);
        let handle =
            ConsumerActor::start_runner(t.store.clone(), runner, Duration::from_secs(3600));
        tokio::time::timeout(Duration::from_secs(30), gate.entered.notified())
            .await
            .expect("the first batch starts");

        let status = tokio::time::timeout(Duration::from_secs(1), handle.status())
            .await
            .expect("status does not wait for the batch")
            .unwrap();
        assert!(status.active, "{backend:?}: active once it took the lock");
        assert_eq!(status.cursor, LogCursor::START);
        assert_eq!(handle.failures(), 0);

        let stopping = actix_rt::spawn({
            let handle = handle.clone();
            async move { handle.stop().await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !stopping.is_finished(),
            "{backend:?}: the stop waits for the batch in flight"
        );
        // Enough for every batch, were the consumer to go on.
        gate.open.add_permits(10);
        stopping.await.unwrap();

        assert_eq!(gate.applied(), vec![first.position], "{backend:?}");
        let stored: (i64, i64) =
            sqlx::query_as("SELECT tx, position FROM consumer_checkpoints WHERE name = 'gate'")
                .fetch_one(t.store.any_pool())
                .await
                .unwrap();
        assert_eq!(stored, (first.tx, first.position), "{backend:?}");
        assert_eq!(handle.cursor(), first);
        t.cleanup().await.unwrap();
    }
}

/// `failures` counts a consumer's failed rounds in a row, read without waiting for
/// it, and is back at 0 once a round succeeds; the failed batches left nothing.
#[actix_rt::test]
async fn a_failing_consumer_counts_its_failures_and_recovers() {
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        let outcome = add(&t.store, "f1", 1, CommandMeta::new("a")).await;
        let target = cursor_after(&t.store, "f1", &outcome).await;
        let gate = Gate::new("flaky", false);
        gate.failing.store(true, Ordering::SeqCst);
        let handle = ConsumerActor::spawn(t.store.clone(), gate.clone())
            .await
            .unwrap();
        assert!(
            eventually(|| handle.failures() >= 2).await,
            "{backend:?}: failures counted"
        );
        assert_eq!(handle.cursor(), LogCursor::START);
        assert!(gate.applied().is_empty());

        gate.failing.store(false, Ordering::SeqCst);
        assert!(
            handle.wait_for(target, Duration::from_secs(30)).await,
            "{backend:?}: it retries after its back-off"
        );
        // The count is reset once the round that applied it ends.
        assert!(
            eventually(|| handle.failures() == 0).await,
            "{backend:?}: failures reset"
        );
        assert_eq!(gate.applied(), vec![target.position]);
        handle.stop().await;
        t.cleanup().await.unwrap();
    }
}

/// Whether `holds` becomes true within 30 s.
async fn eventually(holds: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !holds() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// A consumer under a test's control: it fails while `failing` is set and, if gated,
/// waits in each event for a permit of `open` (saying so on `entered` first).
struct Gate {
    name: String,
    gated: bool,
    failing: AtomicBool,
    entered: tokio::sync::Notify,
    open: tokio::sync::Semaphore,
    applied: std::sync::Mutex<Vec<i64>>,
}

impl Gate {
    fn new(name: &str, gated: bool) -> Arc<Gate> {
        Arc::new(Gate {
            name: name.to_owned(),
            gated,
            failing: AtomicBool::new(false),
            entered: tokio::sync::Notify::new(),
            open: tokio::sync::Semaphore::new(0),
            applied: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The positions applied, in order.
    fn applied(&self) -> Vec<i64> {
        self.applied.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl eventstore::LogHandler for Gate {
    fn name(&self) -> &str {
        &self.name
    }
    fn schema(&self, _: Backend) -> Vec<String> {
        Vec::new()
    }
    fn tables(&self) -> Vec<String> {
        Vec::new()
    }
    async fn apply(
        &self,
        _: &mut eventstore::consumer::ReadModelTx,
        event: &eventstore::StoredEvent,
    ) -> anyhow::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            anyhow::bail!("refusing the event at {}", event.position);
        }
        if self.gated {
            self.entered.notify_one();
            self.open.acquire().await?.forget();
        }
        self.applied.lock().unwrap().push(event.position);
        Ok(())
    }
}

/// Each process caches the aggregates it last wrote. Another process writing in between
/// makes that cache stale: the append conflicts and is retried on fresh state, and a
/// refusal made on stale state is re-checked on fresh state before it is reported.
#[actix_rt::test]
async fn a_stale_aggregate_cache_never_loses_an_update_or_refuses_wrongly() {
    let Some(t) = TestStore::new(Backend::Postgres).await else {
        return;
    };
    let other = Store::open(t.config.clone()).await.unwrap();
    let ours = t.store.aggregate_store::<Counter>(vec![]);
    let theirs = other.aggregate_store::<Counter>(vec![]);
    let run = |store: &Store, events, command| {
        let store = store.clone();
        async move {
            store
                .execute::<Counter>(events, "c", command, &(), &CommandMeta::new("a"))
                .await
        }
    };
    run(&t.store, &ours, CounterCommand::Add { n: 5 })
        .await
        .unwrap(); // ours caches 5
    run(&other, &theirs, CounterCommand::Add { n: 1 })
        .await
        .unwrap(); // now 6
    let o = run(&t.store, &ours, CounterCommand::Add { n: 1 })
        .await
        .unwrap();
    assert_eq!(
        o.sequences,
        Some((3, 3)),
        "conflict on the stale cache, retried fresh"
    );
    let totals: Vec<u64> = read_settled(&t.store, LogCursor::START, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.payload["Added"]["total"].as_u64().unwrap())
        .collect();
    assert_eq!(totals, vec![5, 6, 7], "no lost update");
    // Theirs (cached at 6, stale) sets 0: conflict, retried fresh.
    run(&other, &theirs, CounterCommand::Set { total: 0 })
        .await
        .unwrap();
    // Ours, cached at 7, would refuse "below 5"; fresh state (0) allows it.
    let allowed = run(
        &t.store,
        &ours,
        CounterCommand::AddIfBelow { n: 1, limit: 5 },
    )
    .await;
    assert_eq!(
        allowed.unwrap().sequences,
        Some((5, 5)),
        "a stale refusal is re-checked"
    );
    // Theirs, cached at 0, would allow "below 1"; fresh state (1) refuses it.
    let refused = run(
        &other,
        &theirs,
        CounterCommand::AddIfBelow { n: 1, limit: 1 },
    )
    .await;
    assert!(matches!(refused, Err(ExecuteError::Rejected(_))));
    let totals: Vec<u64> = read_settled(&t.store, LogCursor::START, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.payload["Added"]["total"].as_u64().unwrap())
        .collect();
    assert_eq!(totals, vec![5, 6, 7, 0, 1]);
    other.close().await;
    t.cleanup().await.unwrap();
}

/// A consumer actor whose safety tick is an hour: within a test, only a commit signal
/// can wake it.
async fn spawn_without_tick(store: &Store, handler: Arc<Recorder>) -> eventstore::ConsumerHandle {
    let runner = Runner::new(store.clone(), handler).await.unwrap();
    ConsumerActor::start_runner(store.clone(), runner, Duration::from_secs(3600))
}

/// The log after `after`, once no running transaction holds any of it back (other
/// tests' transactions on the same cluster can, for a moment).
async fn read_settled(
    store: &Store,
    after: LogCursor,
    limit: i64,
) -> Result<Vec<eventstore::StoredEvent>, anyhow::Error> {
    loop {
        let events = store.read_log(after, limit).await?;
        if !store
            .log_held_back(events.last().map(|e| e.cursor()).unwrap_or(after))
            .await?
        {
            return Ok(events);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Port 9 (discard) is closed on loopback: nothing answers there.
const UNREACHABLE: &str = "postgres://postgres@127.0.0.1:9/test";

#[actix_rt::test]
#[should_panic(expected = "CI=true and PostgreSQL is unreachable")]
async fn postgres_tests_fail_rather_than_skip_in_ci_when_postgres_is_down() {
    eventstore::testing::connect_admin(UNREACHABLE, true).await;
}

#[actix_rt::test]
async fn postgres_tests_skip_outside_ci_when_postgres_is_down() {
    assert!(eventstore::testing::connect_admin(UNREACHABLE, false)
        .await
        .is_none());
}

#[test]
fn replace_db_swaps_only_the_database_name() {
    assert_eq!(
        eventstore::testing::replace_db("postgres://postgres@127.0.0.1:5432/test", "x"),
        "postgres://postgres@127.0.0.1:5432/x"
    );
    assert_eq!(
        eventstore::testing::replace_db("postgres://u:p@h/test?sslmode=disable", "x"),
        "postgres://u:p@h/x?sslmode=disable"
    );
}

#[allow(dead_code)]
fn _assert_send(h: Arc<Recorder>) -> Arc<dyn eventstore::LogHandler> {
    h
}

/// Two processes on one PostgreSQL: a commit in one wakes the other's consumer through
/// LISTEN/NOTIFY, well before the safety tick.
#[actix_rt::test]
async fn a_commit_in_another_process_wakes_a_consumer_through_notify() {
    let Some(t) = TestStore::new(Backend::Postgres).await else {
        return;
    };
    // A second, independent store on the same database stands for another process.
    let other = Store::open(t.config.clone()).await.unwrap();
    let recorder = Recorder::new("remote");
    let handle = spawn_without_tick(&t.store, recorder.clone()).await;
    for round in 0..3 {
        let outcome = add(&other, &format!("r{round}"), 1, CommandMeta::new("a")).await;
        let target = other
            .cursor_of(
                "counter",
                &format!("r{round}"),
                outcome.sequences.unwrap().1,
            )
            .await
            .unwrap()
            .unwrap();
        // No safety tick and no local commit: only NOTIFY can wake it.
        assert!(
            handle.wait_for(target, Duration::from_secs(30)).await,
            "round {round}"
        );
    }
    assert_eq!(recorder.seen().len(), 3);
    handle.stop().await;
    other.close().await;
    t.cleanup().await.unwrap();
}

/// Every consumer lock of a process is on one PostgreSQL session: twenty locks are one
/// connection. A second process (another store) is refused each of them; a lock
/// dropped without a release is freed for it; and when the session is killed, every
/// lock of it reports itself dead and another process can take them all.
#[actix_rt::test]
async fn consumer_locks_share_one_session_and_die_with_it() {
    let Some(t) = TestStore::new(Backend::Postgres).await else {
        return;
    };
    let other = Store::open(t.config.clone()).await.unwrap();
    let db = match &t.config {
        StoreConfig::Postgres { url } => url.rsplit('/').next().unwrap().to_owned(),
        StoreConfig::Sqlite { .. } => unreachable!(),
    };
    let sessions = |store: Store| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(DISTINCT pid) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
                 WHERE l.locktype = 'advisory' AND a.datname = $1",
            )
            .bind(db)
            .fetch_one(store.pg_pool().unwrap())
            .await
            .unwrap()
        }
    };
    let mut locks = Vec::new();
    for i in 0..20 {
        let lock = ConsumerLock::try_take(&t.store, &format!("c{i}"))
            .await
            .unwrap();
        locks.push(lock.expect("a free lock is taken"));
    }
    assert_eq!(
        sessions(t.store.clone()).await,
        1,
        "one session holds them all"
    );
    let first_session: i32 = sqlx::query_scalar(
        "SELECT DISTINCT l.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
         WHERE l.locktype = 'advisory' AND a.datname = $1",
    )
    .bind(&db)
    .fetch_one(t.store.pg_pool().unwrap())
    .await
    .unwrap();
    // Held in this process: refused here and in the other.
    assert!(ConsumerLock::try_take(&t.store, "c0")
        .await
        .unwrap()
        .is_none());
    assert!(ConsumerLock::try_take(&other, "c0")
        .await
        .unwrap()
        .is_none());
    // Released, or merely dropped: the other process may take it.
    locks.remove(0).release().await;
    assert!(ConsumerLock::try_take(&other, "c0")
        .await
        .unwrap()
        .is_some());
    drop(locks.remove(0));
    let mut taken = None;
    for _ in 0..50 {
        taken = ConsumerLock::try_take(&other, "c1").await.unwrap();
        if taken.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(taken.is_some(), "a dropped lock is unlocked");
    for lock in &mut locks {
        assert!(lock.is_alive().await);
        assert!(lock.is_current());
    }
    // The session dies: every lock of it is dead, and free for the other process.
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(first_session)
        .fetch_one(t.store.pg_pool().unwrap())
        .await
        .unwrap();
    assert!(killed);
    for lock in &mut locks {
        assert!(!lock.is_alive().await, "a lock of a lost session is dead");
        // And a consumer about to apply a batch sees it without asking the database.
        assert!(!lock.is_current());
    }
    for i in 2..20 {
        assert!(
            ConsumerLock::try_take(&other, &format!("c{i}"))
                .await
                .unwrap()
                .is_some(),
            "c{i} is free once its session is gone"
        );
    }
    // And the first process takes new locks on a new session.
    assert!(ConsumerLock::try_take(&t.store, "fresh")
        .await
        .unwrap()
        .is_some());
    drop(locks);
    drop(taken);
    t.cleanup().await.unwrap();
}

/// The one job queue: a job queued twice is one row; due jobs come in queue order,
/// not before their time; an outcome is recorded only from the state it was read in;
/// dead letters are requeued per worker; an old work list is moved in and dropped.
#[actix_rt::test]
async fn the_job_queue_keeps_one_row_per_job_and_its_dead_letters() {
    use eventstore::jobs::{self, NewJob, Outcome};
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        let pool = t.store.any_pool();
        let job = |subject: &'static str, position: i64| NewJob {
            worker: "chain",
            kind: "grant",
            subject,
            event_id: Some("e"),
            payload: Some("{}"),
            position,
        };
        assert!(jobs::enqueue(pool, &job("b", 2)).await.unwrap());
        assert!(jobs::enqueue(pool, &job("a", 1)).await.unwrap());
        assert!(
            !jobs::enqueue(pool, &job("a", 1)).await.unwrap(),
            "{backend:?}"
        );
        let other = NewJob {
            worker: "mpesa",
            kind: "push",
            ..job("a", 3)
        };
        assert!(jobs::enqueue(pool, &other).await.unwrap());
        let due = jobs::due(pool, "chain", None, 10).await.unwrap();
        let subjects: Vec<&str> = due.iter().map(|j| j.subject.as_str()).collect();
        assert_eq!(subjects, ["a", "b"], "{backend:?}");
        assert!(jobs::is_pending(pool, "chain", "grant", "a").await.unwrap());

        // A failure puts it off: not due until its time.
        let first = &due[0];
        let later = Outcome {
            state: "pending",
            attempts: 1,
            next_attempt_at: jobs::after(Duration::from_secs(3600)),
            error: "node down",
        };
        assert!(jobs::record(pool, first, &later).await.unwrap());
        let due = jobs::due(pool, "chain", Some("grant"), 10).await.unwrap();
        assert_eq!(due.len(), 1, "{backend:?}");
        // Recorded from a state it is no longer in: nothing changes.
        let mut stale = first.clone();
        stale.state = "sending".into();
        assert!(!jobs::record(pool, &stale, &later).await.unwrap());
        // Nor from a copy in the same state read before the attempt was counted: the
        // attempts and the due time are not set back.
        let again = Outcome {
            next_attempt_at: 0,
            ..later.clone()
        };
        assert!(
            !jobs::record(pool, first, &again).await.unwrap(),
            "{backend:?}"
        );
        let due_now = jobs::due(pool, "chain", Some("grant"), 10).await.unwrap();
        let subjects: Vec<&str> = due_now.iter().map(|j| j.subject.as_str()).collect();
        assert_eq!(subjects, ["b"], "{backend:?}");
        // Marked out, then dead.
        assert!(jobs::mark(pool, &due[0], "sending").await.unwrap());
        assert_eq!(
            jobs::in_state(pool, "chain", "sending")
                .await
                .unwrap()
                .len(),
            1
        );
        let mut out = due[0].clone();
        out.state = "sending".into();
        let dead = Outcome {
            state: "dead",
            attempts: 5,
            next_attempt_at: 0,
            error: "reverted",
        };
        assert!(jobs::record(pool, &out, &dead).await.unwrap());
        let troubled = jobs::troubled(pool, 10).await.unwrap();
        assert_eq!(troubled.len(), 2, "{backend:?}");
        assert_eq!(troubled[0].last_error.as_deref(), Some("reverted"));
        // Requeued per worker: another worker's are not touched.
        assert_eq!(jobs::retry(pool, "mpesa", &[]).await.unwrap(), 0);
        assert_eq!(jobs::retry(pool, "chain", &["b".into()]).await.unwrap(), 1);
        let due = jobs::due(pool, "chain", None, 10).await.unwrap();
        assert_eq!((due.len(), due[0].attempts), (1, 0), "{backend:?}");
        jobs::finish(pool, &due[0]).await.unwrap();
        let counts = jobs::counts(pool).await.unwrap();
        let rows: Vec<(&str, &str, i64)> = counts
            .iter()
            .map(|c| (c.worker.as_str(), c.state.as_str(), c.jobs))
            .collect();
        assert_eq!(rows, [("chain", "pending", 1), ("mpesa", "pending", 1)]);

        // An old work list is moved in once, and dropped.
        sqlx::query("CREATE TABLE old_jobs (id TEXT, position BIGINT)")
            .execute(pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO old_jobs VALUES ('x', 9), ('a', 3)")
            .execute(pool)
            .await
            .unwrap();
        let select = "SELECT 'mpesa', 'push', id, NULL, NULL, position, 'pending', 0, 0, \
                      NULL, '' FROM old_jobs";
        let moved = jobs::adopt(pool, backend, "old_jobs", select)
            .await
            .unwrap();
        assert_eq!(moved, 1, "{backend:?}: the job queued already is kept once");
        assert_eq!(
            jobs::adopt(pool, backend, "old_jobs", select)
                .await
                .unwrap(),
            0
        );
        assert_eq!(jobs::due(pool, "mpesa", None, 10).await.unwrap().len(), 2);
        t.cleanup().await.unwrap();
    }
}

/// A read model whose schema is versioned: version 1 keeps positions; version 2 adds
/// the aggregate id.
struct Shaped {
    version: u32,
}

#[async_trait::async_trait]
impl eventstore::LogHandler for Shaped {
    fn name(&self) -> &str {
        "shaped"
    }
    fn schema(&self, _: Backend) -> Vec<String> {
        vec![match self.version {
            1 => "CREATE TABLE IF NOT EXISTS rm_shaped (position BIGINT PRIMARY KEY)".into(),
            _ => "CREATE TABLE IF NOT EXISTS rm_shaped (position BIGINT PRIMARY KEY, \
                  aggregate_id TEXT NOT NULL)"
                .into(),
        }]
    }
    fn schema_version(&self) -> u32 {
        self.version
    }
    fn tables(&self) -> Vec<String> {
        vec!["rm_shaped".into()]
    }
    async fn apply(
        &self,
        tx: &mut eventstore::consumer::ReadModelTx,
        event: &eventstore::StoredEvent,
    ) -> anyhow::Result<()> {
        let sql = match self.version {
            1 => "INSERT INTO rm_shaped (position) VALUES ($1)",
            _ => "INSERT INTO rm_shaped (position, aggregate_id) VALUES ($1, $2)",
        };
        let mut query = sqlx::query(sql).bind(event.position);
        if self.version > 1 {
            query = query.bind(event.aggregate_id.clone());
        }
        query.execute(&mut **tx).await?;
        Ok(())
    }
}

/// A projection started under a new schema version drops its tables, creates them in
/// the new shape and replays the log, instead of keeping the old shape; started again
/// under the same version it keeps what it built.
#[actix_rt::test]
async fn a_changed_read_model_schema_is_rebuilt_from_the_log_on_start() {
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        for i in 0..3 {
            add(&t.store, &format!("s{i}"), 1, CommandMeta::new("a")).await;
        }
        let mut v1 = Runner::new(t.store.clone(), Arc::new(Shaped { version: 1 }))
            .await
            .unwrap();
        assert!(v1.try_lock().await.unwrap());
        assert_eq!(v1.drain().await.unwrap(), 3);
        v1.unlock().await;
        drop(v1);

        let mut v2 = Runner::new(t.store.clone(), Arc::new(Shaped { version: 2 }))
            .await
            .unwrap();
        assert_eq!(
            v2.cursor(),
            LogCursor::START,
            "{backend:?}: replayed from the start"
        );
        assert!(v2.try_lock().await.unwrap());
        assert_eq!(v2.drain().await.unwrap(), 3, "{backend:?}");
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT aggregate_id FROM rm_shaped ORDER BY position")
                .fetch_all(t.store.any_pool())
                .await
                .unwrap();
        assert_eq!(
            ids,
            ["s0", "s1", "s2"],
            "{backend:?}: the new column is filled"
        );
        let end = v2.cursor();
        v2.unlock().await;
        drop(v2);

        let again = Runner::new(t.store.clone(), Arc::new(Shaped { version: 2 }))
            .await
            .unwrap();
        assert_eq!(again.cursor(), end, "{backend:?}: the same version is kept");
        drop(again);
        t.cleanup().await.unwrap();
    }
}
