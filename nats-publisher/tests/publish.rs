#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
//! The publisher against a real NATS server with JetStream (`NATS_URL`, default
//! `nats://127.0.0.1:4222`) on both store backends: each event arrives once, on its
//! subject, with the mapper's body and the event id as message id; a replay after a
//! lost checkpoint is deduplicated by JetStream.
//!
//! When NATS is unreachable the tests are skipped with a message, except under
//! `CI=true`, where they fail.

use std::sync::Arc;
use std::time::Duration;

use eventstore::testing::{in_ci, Counter, CounterCommand, TestStore, BACKENDS};
use eventstore::{CommandMeta, LogCursor, Runner, Store, StoredEvent};
use nats_publisher::{Mapper, NatsPublisher, NatsSettings, CONSUMER_NAME};

async fn run(store: &Store, id: &str, command: CounterCommand) {
    let events = store.aggregate_store::<Counter>(vec![]);
    store
        .execute::<Counter>(&events, id, command, &(), &CommandMeta::new("test:nats"))
        .await
        .unwrap();
}

// --- NATS helpers -----------------------------------------------------------------

fn nats_url() -> String {
    std::env::var("NATS_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned())
}

/// A JetStream context on the test server; `None` (skip) when it is unreachable
/// outside CI, a panic under CI.
async fn jetstream_or_skip() -> Option<async_nats::jetstream::Context> {
    let connected = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .connect(nats_url())
        .await;
    match connected {
        Ok(client) => Some(async_nats::jetstream::new(client)),
        Err(error) => {
            if in_ci() {
                panic!("CI=true and NATS is unreachable at NATS_URL: {error}");
            }
            eprintln!("SKIPPED: NATS unreachable ({error}); set NATS_URL");
            None
        }
    }
}

/// Settings with a stream and a prefix of this test's own.
fn unique_settings() -> NatsSettings {
    let id = uuid::Uuid::new_v4().simple().to_string();
    NatsSettings {
        url: nats_url(),
        stream: format!("AFYA_TEST_{id}"),
        subject_prefix: format!("afyatest.{id}"),
        ..NatsSettings::default()
    }
}

/// What the composition root would supply: here, event type, id and payload.
fn test_mapper() -> Mapper {
    Arc::new(|event: &StoredEvent| {
        serde_json::to_vec(&serde_json::json!({
            "id": event.event_id,
            "type": event.event_type,
            "payload": event.payload,
        }))
        .unwrap()
    })
}

async fn read_log(store: &Store) -> Vec<StoredEvent> {
    // Settled: on PostgreSQL an event is readable once no older transaction runs.
    for _ in 0..200 {
        if !store.log_held_back(LogCursor::START).await.unwrap() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    store.read_log(LogCursor::START, 1000).await.unwrap()
}

/// Every message of the stream, in stream order.
async fn stream_messages(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let mut stream = js.get_stream(name).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut messages = Vec::new();
    for sequence in state.first_sequence..=state.last_sequence {
        if state.messages == 0 {
            break;
        }
        messages.push(stream.get_raw_message(sequence).await.unwrap());
    }
    assert_eq!(messages.len() as u64, state.messages);
    messages
}

fn assert_published_once(
    publisher: &NatsPublisher,
    mapper: &Mapper,
    log: &[StoredEvent],
    messages: &[async_nats::jetstream::message::StreamMessage],
    context: &str,
) {
    assert_eq!(
        messages.len(),
        log.len(),
        "{context}: one message per event"
    );
    for (event, message) in log.iter().zip(messages) {
        assert_eq!(
            message.subject.as_str(),
            publisher.subject(&event.event_type),
            "{context}"
        );
        assert_eq!(
            message.payload.as_ref(),
            mapper(event).as_slice(),
            "{context}"
        );
        let id = message
            .headers
            .get("Nats-Msg-Id")
            .expect("a Nats-Msg-Id header");
        assert_eq!(id.as_str(), event.event_id.to_string(), "{context}");
    }
}

// --- tests ------------------------------------------------------------------------

#[actix_rt::test]
async fn events_are_published_once_each_and_a_replay_is_deduplicated() {
    let Some(js) = jetstream_or_skip().await else {
        return;
    };
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        let settings = unique_settings();
        let stream_name = settings.stream.clone();
        let mapper = test_mapper();
        let publisher = Arc::new(
            NatsPublisher::connect(settings, mapper.clone())
                .await
                .unwrap(),
        );
        assert_eq!(
            publisher.subject("Added"),
            format!("{}.Added", publisher.settings().subject_prefix)
        );

        run(&t.store, "c1", CounterCommand::Add { n: 2 }).await;
        run(&t.store, "c1", CounterCommand::AddTwice { n: 3 }).await;
        run(&t.store, "c2", CounterCommand::Add { n: 1 }).await;
        run(&t.store, "c1", CounterCommand::Reset).await;
        let log = read_log(&t.store).await;
        assert_eq!(log.len(), 5, "{backend:?}");

        let mut runner = Runner::new(t.store.clone(), publisher.clone())
            .await
            .unwrap();
        assert_eq!(runner.name(), CONSUMER_NAME);
        assert_eq!(runner.drain().await.unwrap(), 5, "{backend:?}");
        let messages = stream_messages(&js, &stream_name).await;
        assert_published_once(
            &publisher,
            &mapper,
            &log,
            &messages,
            &format!("{backend:?} first run"),
        );
        assert_eq!(
            messages
                .iter()
                .filter(|m| m.subject.ends_with(".Reset"))
                .count(),
            1
        );

        // A crash that lost the checkpoint: everything is applied again, and JetStream
        // drops every re-publish as a duplicate.
        sqlx::query(
            "UPDATE consumer_checkpoints SET tx = 0, position = 0 WHERE name = 'nats_publisher'",
        )
        .execute(t.store.any_pool())
        .await
        .unwrap();
        let mut runner = Runner::new(t.store.clone(), publisher.clone())
            .await
            .unwrap();
        assert_eq!(runner.cursor(), LogCursor::START);
        assert_eq!(runner.drain().await.unwrap(), 5, "{backend:?} replay");
        let messages = stream_messages(&js, &stream_name).await;
        assert_published_once(
            &publisher,
            &mapper,
            &log,
            &messages,
            &format!("{backend:?} after replay"),
        );

        // New events after the replay are published as usual.
        run(&t.store, "c2", CounterCommand::Add { n: 4 }).await;
        assert_eq!(runner.drain().await.unwrap(), 1, "{backend:?}");
        let log = read_log(&t.store).await;
        let messages = stream_messages(&js, &stream_name).await;
        assert_published_once(
            &publisher,
            &mapper,
            &log,
            &messages,
            &format!("{backend:?} after a new event"),
        );

        js.delete_stream(&stream_name).await.unwrap();
        t.cleanup().await.unwrap();
    }
}

#[actix_rt::test]
async fn connect_updates_an_existing_stream() {
    let Some(js) = jetstream_or_skip().await else {
        return;
    };
    let settings = unique_settings();
    let stream_name = settings.stream.clone();
    NatsPublisher::connect(settings.clone(), test_mapper())
        .await
        .unwrap();
    let longer = NatsSettings {
        duplicate_window: Duration::from_secs(600),
        ..settings.clone()
    };
    NatsPublisher::connect(longer, test_mapper()).await.unwrap();
    let mut stream = js.get_stream(&stream_name).await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(config.duplicate_window, Duration::from_secs(600));
    assert_eq!(
        config.subjects,
        vec![format!("{}.>", settings.subject_prefix)]
    );
    js.delete_stream(&stream_name).await.unwrap();
}

#[actix_rt::test]
async fn an_unreachable_server_is_a_clear_error_without_credentials() {
    let settings = NatsSettings {
        // Port 1 on loopback: nothing listens there.
        url: "nats://someone:hunter2@127.0.0.1:1".to_owned(),
        ..unique_settings()
    };
    let error = NatsPublisher::connect(settings, test_mapper())
        .await
        .unwrap_err();
    let shown = format!("{error:#}");
    assert!(shown.contains("NATS is unreachable"), "{shown}");
    assert!(shown.contains("127.0.0.1:1"), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
}
