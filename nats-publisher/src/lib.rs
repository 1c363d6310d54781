//! An optional publisher of the global event log to NATS JetStream.
//!
//! [`NatsPublisher`] is a checkpointed consumer of the log (an
//! [`eventstore::LogHandler`]): run it with [`eventstore::ConsumerActor::spawn`] or an
//! [`eventstore::Runner`]. For each event, in log order, it publishes one message on
//! `{subject_prefix}.{EventType}` and waits for JetStream's acknowledgement before the
//! runner moves its checkpoint. The message id (`Nats-Msg-Id`) is the event id, so the
//! events a crash makes the runner apply again are dropped by JetStream's
//! deduplication (docs/architecture.md rule 4) as long as they come back within the stream's
//! duplicate window.
//!
//! What integrators see is not decided here: the message body is whatever the
//! [`Mapper`] supplied by the composition root makes of the event.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, message::PublishMessage, stream};
use async_trait::async_trait;
use eventstore::consumer::ReadModelTx;
use eventstore::{Backend, LogHandler, StoredEvent};

/// Turns a stored event into the body of its NATS message. It decides what leaves the
/// system: it must not put plaintext personal data or medical content in the body.
pub type Mapper = Arc<dyn Fn(&StoredEvent) -> Vec<u8> + Send + Sync>;

/// The consumer name: the checkpoint and the consumer lock are keyed by it.
pub const CONSUMER_NAME: &str = "nats_publisher";

/// Default JetStream stream name.
pub const DEFAULT_STREAM: &str = "AFYACHAIN_EVENTS";

/// Default prefix of the subjects events are published on.
pub const DEFAULT_SUBJECT_PREFIX: &str = "afyachain.events";

/// Default duplicate window of the stream.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how events are published.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsSettings {
    /// The NATS server, e.g. `nats://127.0.0.1:4222` (several may be given, separated by
    /// commas). It may carry credentials; it is never logged.
    pub url: String,
    /// The JetStream stream holding the events (created or updated on connect).
    pub stream: String,
    /// Events are published on `{subject_prefix}.{EventType}`; the stream takes
    /// `{subject_prefix}.>`.
    pub subject_prefix: String,
    /// How long JetStream remembers message ids: a re-publish (after a crash) within
    /// this window is dropped as a duplicate.
    pub duplicate_window: Duration,
}

impl NatsSettings {
    /// Settings for the server at `url`, with the default stream, prefix and window.
    pub fn new(url: impl Into<String>) -> NatsSettings {
        NatsSettings {
            url: url.into(),
            stream: DEFAULT_STREAM.to_owned(),
            subject_prefix: DEFAULT_SUBJECT_PREFIX.to_owned(),
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
        }
    }
}

impl Default for NatsSettings {
    /// A local server (`nats://127.0.0.1:4222`) with the defaults.
    fn default() -> Self {
        NatsSettings::new("nats://127.0.0.1:4222")
    }
}

impl fmt::Debug for NatsSettings {
    // The URL may hold credentials: they are left out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSettings")
            .field("url", &redact_url(&self.url))
            .field("stream", &self.stream)
            .field("subject_prefix", &self.subject_prefix)
            .field("duplicate_window", &self.duplicate_window)
            .finish()
    }
}

/// A server list without the user information (`user:password@`, tokens) of each URL.
fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let one = one.trim();
            let (scheme, rest) = match one.split_once("://") {
                Some((scheme, rest)) => (Some(scheme), rest),
                None => (None, one),
            };
            let rest = match rest.rsplit_once('@') {
                Some((_, host)) => format!("***@{host}"),
                None => rest.to_owned(),
            };
            match scheme {
                Some(scheme) => format!("{scheme}://{rest}"),
                None => rest,
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Publishes the event log to a JetStream stream; a [`LogHandler`] named
/// [`CONSUMER_NAME`], with no tables of its own.
pub struct NatsPublisher {
    settings: NatsSettings,
    mapper: Mapper,
    jetstream: jetstream::Context,
}

impl fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsPublisher")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl NatsPublisher {
    /// Connects to NATS and creates the stream, or updates it to `settings` (subjects
    /// `{subject_prefix}.>`, duplicate window). Fails at once when the server is
    /// unreachable or has JetStream disabled.
    pub async fn connect(settings: NatsSettings, mapper: Mapper) -> anyhow::Result<NatsPublisher> {
        let prefix = settings.subject_prefix.trim_end_matches('.');
        anyhow::ensure!(
            !prefix.is_empty() && prefix.split('.').all(is_plain_token),
            "NATS subject prefix {:?} is not a plain subject (tokens of letters, digits, '_' or '-', separated by '.')",
            settings.subject_prefix
        );
        anyhow::ensure!(
            is_plain_token(&settings.stream),
            "NATS stream name {:?} must be letters, digits, '_' or '-'",
            settings.stream
        );
        let settings = NatsSettings {
            subject_prefix: prefix.to_owned(),
            ..settings
        };
        let server = redact_url(&settings.url);
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(CONNECT_TIMEOUT)
            .connect(settings.url.as_str())
            .await
            .with_context(|| format!("NATS is unreachable at {server}"))?;
        let jetstream = jetstream::new(client);
        let config = stream::Config {
            name: settings.stream.clone(),
            subjects: vec![format!("{}.>", settings.subject_prefix)],
            duplicate_window: settings.duplicate_window,
            ..Default::default()
        };
        jetstream
            .create_or_update_stream(config)
            .await
            .with_context(|| {
                format!(
                    "creating or updating the JetStream stream {} at {server} (is JetStream enabled?)",
                    settings.stream
                )
            })?;
        tracing::info!(
            stream = %settings.stream,
            subjects = %format!("{}.>", settings.subject_prefix),
            "publishing the event log to NATS JetStream"
        );
        Ok(NatsPublisher {
            settings,
            mapper,
            jetstream,
        })
    }

    /// The subject events of type `event_type` are published on:
    /// `{subject_prefix}.{event_type}`, with any character of `event_type` that may
    /// not appear in a subject token (`.`, `*`, `>`, spaces, …) replaced by `_`.
    pub fn subject(&self, event_type: &str) -> String {
        format!(
            "{}.{}",
            self.settings.subject_prefix,
            subject_token(event_type)
        )
    }

    /// The settings in use (the subject prefix without a trailing `.`).
    pub fn settings(&self) -> &NatsSettings {
        &self.settings
    }

    /// Publishes one event and waits for JetStream to store it (or to report it as a
    /// duplicate of a message it already holds).
    pub async fn publish(&self, event: &StoredEvent) -> anyhow::Result<()> {
        let subject = self.subject(&event.event_type);
        let body = (self.mapper)(event);
        let message = PublishMessage::build()
            .payload(body.into())
            .message_id(event.event_id.to_string())
            .expected_stream(&self.settings.stream);
        let ack = self
            .jetstream
            .send_publish(subject, message)
            .await
            .with_context(|| {
                format!(
                    "publishing the event at position {} to NATS",
                    event.position
                )
            })?
            .await
            .with_context(|| {
                format!(
                    "waiting for JetStream to store the event at position {}",
                    event.position
                )
            })?;
        tracing::debug!(
            position = event.position,
            event_type = %event.event_type,
            stream_sequence = ack.sequence,
            duplicate = ack.duplicate,
            "event published to NATS"
        );
        Ok(())
    }
}

/// `event_type` as one subject token: characters other than letters, digits, `_` and
/// `-` become `_`.
fn subject_token(event_type: &str) -> String {
    let token = eventstore::consumer::safe_token(event_type);
    if token.is_empty() {
        "_".to_owned()
    } else {
        token
    }
}

/// Whether `token` is non-empty and already a safe token (nothing to replace).
fn is_plain_token(token: &str) -> bool {
    !token.is_empty() && eventstore::consumer::safe_token(token) == token
}

#[async_trait]
impl LogHandler for NatsPublisher {
    fn name(&self) -> &str {
        CONSUMER_NAME
    }

    /// A publisher: its effect is outside, idempotent by event id (the message id).
    fn kind(&self) -> eventstore::Kind {
        eventstore::Kind::Reactor
    }

    fn schema(&self, _backend: Backend) -> Vec<String> {
        Vec::new()
    }

    fn tables(&self) -> Vec<String> {
        Vec::new()
    }

    async fn apply(&self, _tx: &mut ReadModelTx, event: &StoredEvent) -> anyhow::Result<()> {
        self.publish(event).await
    }

    fn waits_outside(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn defaults() {
        let s = NatsSettings::new("nats://h:4222");
        assert_eq!(s.stream, "AFYACHAIN_EVENTS");
        assert_eq!(s.subject_prefix, "afyachain.events");
        assert_eq!(s.duplicate_window, Duration::from_secs(120));
        assert_eq!(NatsSettings::default().url, "nats://127.0.0.1:4222");
    }

    #[test]
    fn debug_leaves_credentials_out() {
        let s = NatsSettings::new("nats://alice:s3cret@h1:4222, tls://tok@h2:4222,h3:4222");
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(!shown.contains("alice"), "{shown}");
        assert!(!shown.contains("tok@"), "{shown}");
        assert!(
            shown.contains("nats://***@h1:4222,tls://***@h2:4222,h3:4222"),
            "{shown}"
        );
    }

    #[test]
    fn plain_tokens() {
        assert!(is_plain_token("AFYACHAIN_EVENTS"));
        assert!(!is_plain_token("a.b"));
        assert!(!is_plain_token("a*"));
        assert!(!is_plain_token(""));
    }

    #[test]
    fn event_types_become_one_subject_token() {
        assert_eq!(subject_token("RecordUploaded"), "RecordUploaded");
        assert_eq!(subject_token("a.b *>c"), "a_b___c");
        assert_eq!(subject_token(""), "_");
    }
}
