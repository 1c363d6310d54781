//! Integrators: the live event stream (Server-Sent Events) and which event types a key
//! may receive.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header;
use actix_web::web::{Bytes, Data, Query};
use actix_web::{HttpRequest, HttpResponse};
use domain::actor::Actor;
use domain::ids::IntegratorId;
use domain::integrator::Integrator;
use eventstore::{LogCursor, Store, StoredEvent};
use serde::Deserialize;
use tokio::sync::broadcast;
use utoipa::IntoParams;

use crate::extract::Caller;
use crate::problem::{Problem, Validation};
use crate::routes::whole;
use crate::server::AppState;

/// Events read from the store per query while catching up.
const CATCH_UP_BATCH: i64 = 200;
/// Chunks (events or heartbeats) waiting for one client's socket.
const CHANNEL_CHUNKS: usize = 16;

/// `all`, or comma-separated event types, each one of `known`.
pub fn parse_types(raw: &str, known: &[&str]) -> Result<BTreeSet<String>, String> {
    let raw = raw.trim();
    if raw.eq_ignore_ascii_case("all") {
        return Ok(known.iter().map(|t| (*t).to_owned()).collect());
    }
    let mut types = BTreeSet::new();
    for name in raw.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if !known.contains(&name) {
            return Err(format!("{name} is not an event type"));
        }
        types.insert(name.to_owned());
    }
    if types.is_empty() {
        return Err("name at least one event type, or all".to_owned());
    }
    Ok(types)
}

/// The integrator behind the key, with the types it may receive.
pub async fn integrator(
    state: &AppState,
    caller: &Caller,
) -> Result<(IntegratorId, Integrator), Problem> {
    let Actor::Integrator(id) = caller.actor() else {
        return Err(Problem::forbidden(
            "role_forbidden",
            "only integrators (API keys) may do this",
        ));
    };
    Ok((id, state.commands.integrator(id).await?))
}

/// `types` narrowed to those the key allows: unknown names are 422, names the key does
/// not allow 403. Absent: everything the key allows.
pub fn narrow(raw: Option<&str>, allowed: &BTreeSet<String>) -> Result<BTreeSet<String>, Problem> {
    let Some(raw) = raw.filter(|r| !r.trim().is_empty()) else {
        return Ok(allowed.clone());
    };
    let asked =
        parse_types(raw, integrations::event_types()).map_err(|e| Problem::field("types", e))?;
    if !asked.is_subset(allowed) {
        return Err(Problem::forbidden(
            "event_types_not_allowed",
            "the key does not allow some of these event types",
        ));
    }
    Ok(asked)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Start with the event at this log position (0: the whole log). Default: only
    /// events from now on. A `Last-Event-ID` header (the last `id:` received) takes
    /// precedence: the stream resumes right after that event.
    pub from_position: Option<String>,
    /// Comma-separated event types (default: all the key allows).
    pub types: Option<String>,
}

#[utoipa::path(get, path = "/v1/events/stream", tag = "integrators",
    params(StreamQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "Server-Sent Events (`text/event-stream`): each event's public view (no personal data or medical content) as `data:`, its type as `event:`, its log position as `id:`; catch-up, then live; a `: heartbeat` comment when idle; resumable with `Last-Event-ID`. A client that accepts nothing for `AFYA_SSE_SLOW_CLIENT_SECS` is disconnected and resumes (integrators)", content_type = "text/event-stream", body = String)))]
#[tracing::instrument(skip_all)]
pub async fn stream(
    req: HttpRequest,
    state: Data<AppState>,
    caller: Caller,
    query: Query<StreamQuery>,
) -> Result<HttpResponse, Problem> {
    let (integrator_id, key) = integrator(&state, &caller).await?;
    let allowed = key.event_types();
    let mut v = Validation::default();
    let last_event_id = match req.headers().get("last-event-id") {
        None => None,
        Some(value) => match value
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
        {
            Some(p) if p >= 0 => Some(p),
            _ => {
                v.fail(
                    "Last-Event-ID",
                    "must be a log position: a whole number, 0 or more",
                );
                None
            }
        },
    };
    let from_position = whole(
        &mut v,
        "from_position",
        query.from_position.as_deref().map(str::trim),
    );
    v.finish()?;
    let types = narrow(query.types.as_deref(), allowed)?;
    let slot = StreamSlot::take(&state, integrator_id)?;
    let store = state.store.clone();
    let cursor = match (last_event_id, from_position) {
        (Some(last), _) => store.cursor_after_position(last).await?,
        (None, Some(from)) => store.cursor_at_position(from).await?,
        (None, None) => store.log_end().await?,
    };
    let sse = Sse {
        integrator_id: integrator_id.to_string(),
        stopped: state.live.stopped(),
        store,
        live: state.live.clone(),
        rx: None,
        cursor,
        types: Arc::new(types),
        phase: Phase::CatchUp,
        pending: std::collections::VecDeque::new(),
        heartbeat: state.config.integrations.heartbeat,
        last_sent: Instant::now(),
    };
    // The stream is produced on its own task into a small channel: a client that
    // accepts nothing for `slow_client` (its socket buffers full) is disconnected, and
    // one that merely falls behind the live tail catches up from the store instead.
    let (chunks, mut rx) = tokio::sync::mpsc::channel::<Bytes>(CHANNEL_CHUNKS);
    let slow_client = state.config.integrations.slow_client;
    actix_rt::spawn(async move {
        let mut sse = sse;
        while let Some(chunk) = sse.next().await {
            match chunks.send_timeout(chunk, slow_client).await {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::SendTimeoutError::Timeout(_)) => {
                    tracing::info!(
                        position = sse.cursor.position,
                        "event stream client accepted nothing for too long; disconnecting it"
                    );
                    return;
                }
                // The client went away.
                Err(tokio::sync::mpsc::error::SendTimeoutError::Closed(_)) => return,
            }
        }
    });
    // The slot is freed when the response body is dropped (the client went away).
    let body = futures::stream::poll_fn(move |cx| {
        let _held = &slot;
        rx.poll_recv(cx)
            .map(|chunk| chunk.map(Ok::<_, actix_web::Error>))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

/// One of a key's concurrent streams (at most `AFYA_SSE_MAX_STREAMS_PER_KEY`), given
/// back when dropped.
struct StreamSlot {
    open: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<IntegratorId, usize>>>,
    integrator_id: IntegratorId,
}

impl StreamSlot {
    fn take(state: &AppState, integrator_id: IntegratorId) -> Result<StreamSlot, Problem> {
        let max = state.config.integrations.max_streams_per_key;
        let mut open = state
            .streams
            .lock()
            .map_err(|_| Problem::internal(&anyhow::anyhow!("stream slots poisoned")))?;
        let count = open.entry(integrator_id).or_insert(0);
        if *count >= max {
            return Err(Problem::new(
                actix_web::http::StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                format!("a key may hold {max} event streams at once; close one first"),
            ));
        }
        *count += 1;
        Ok(StreamSlot {
            open: state.streams.clone(),
            integrator_id,
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.open.lock() {
            if let Some(count) = open.get_mut(&self.integrator_id) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    open.remove(&self.integrator_id);
                }
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading from the store, not yet following the live tail.
    CatchUp,
    /// Following the live tail, reading the store once more to close the gap.
    Closing,
    /// Taking events from the live tail only.
    Live,
}

/// One client's stream.
struct Sse {
    /// Whose key: the stream ends when that key is withdrawn.
    integrator_id: String,
    /// The server is stopping: end the stream.
    stopped: tokio::sync::watch::Receiver<bool>,
    store: Store,
    live: crate::live::LiveLog,
    rx: Option<broadcast::Receiver<Arc<StoredEvent>>>,
    /// The last event considered (sent or filtered out).
    cursor: LogCursor,
    types: Arc<BTreeSet<String>>,
    phase: Phase,
    pending: std::collections::VecDeque<Bytes>,
    heartbeat: Duration,
    last_sent: Instant,
}

impl Sse {
    /// The next chunk to send; `None` ends the stream (the client reconnects).
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if *self.stopped.borrow() {
                return None;
            }
            if let Some(chunk) = self.pending.pop_front() {
                self.last_sent = Instant::now();
                return Some(chunk);
            }
            if self.phase != Phase::Live {
                let events = match self.store.read_log(self.cursor, CATCH_UP_BATCH).await {
                    Ok(events) => events,
                    Err(error) => {
                        tracing::error!(
                            error = format!("{error:#}"),
                            "event stream could not read the log"
                        );
                        return None;
                    }
                };
                if events.is_empty() {
                    // Subscribing before the last read means every event after that
                    // read's end comes through the tail (none is missed in between).
                    if self.phase == Phase::CatchUp {
                        self.rx = Some(self.live.subscribe());
                        self.phase = Phase::Closing;
                    } else {
                        self.phase = Phase::Live;
                    }
                    continue;
                }
                for event in &events {
                    if !self.take(event) {
                        return None;
                    }
                }
                if self.pending.is_empty() && self.last_sent.elapsed() >= self.heartbeat {
                    self.pending
                        .push_back(Bytes::from_static(b": heartbeat\n\n"));
                }
                continue;
            }
            let rx = self.rx.as_mut()?;
            let wait = self.heartbeat.saturating_sub(self.last_sent.elapsed());
            let received = tokio::select! {
                received = tokio::time::timeout(wait, rx.recv()) => received,
                _ = self.stopped.changed() => return None,
            };
            match received {
                Err(_) => self
                    .pending
                    .push_back(Bytes::from_static(b": heartbeat\n\n")),
                Ok(Ok(event)) => {
                    if !self.take(&event) {
                        return None;
                    }
                }
                Ok(Err(broadcast::error::RecvError::Lagged(missed))) => {
                    // Behind the ring: read the missed events from the store again.
                    tracing::debug!(
                        missed,
                        "event stream client behind the live tail; catching up"
                    );
                    self.rx = None;
                    self.phase = Phase::CatchUp;
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => return None,
            }
        }
    }

    /// Queues `event` if it is past the cursor and of a wanted type; `false` when the
    /// stream must end (its key was withdrawn).
    fn take(&mut self, event: &StoredEvent) -> bool {
        if event.cursor() <= self.cursor {
            return true;
        }
        self.cursor = event.cursor();
        if event.event_type == "IntegratorDisabled" && event.aggregate_id == self.integrator_id {
            tracing::info!("event stream ended: its key was withdrawn");
            return false;
        }
        if !self.types.contains(&event.event_type) {
            return true;
        }
        match serde_json::to_string(&integrations::public_view(event)) {
            Ok(data) => self.pending.push_back(Bytes::from(format!(
                "id: {}\nevent: {}\ndata: {data}\n\n",
                event.position, event.event_type
            ))),
            Err(error) => tracing::error!(%error, "could not encode an event for the stream"),
        }
        true
    }
}
