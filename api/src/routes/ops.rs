//! Health, readiness, metrics and the OpenAPI document.

use actix_web::web::Data;
use actix_web::HttpResponse;
use utoipa::OpenApi;

use crate::problem::Problem;
use crate::server::AppState;

#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is up")))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// What the web app needs to know of this server's settings.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ClientConfig {
    /// The largest record upload in bytes; a larger one gets 413.
    pub max_upload_bytes: usize,
    /// Whether M-Pesa payments are configured (otherwise `POST /v1/payments` gets 503).
    pub payments: bool,
    /// Prefix of a block explorer's transaction page, if one is configured.
    pub explorer_tx_url: Option<String>,
}

#[utoipa::path(get, path = "/v1/client-config", tag = "operations",
    responses((status = 200, description = "Settings the web app adapts to", body = ClientConfig)))]
pub async fn client_config(state: Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(ClientConfig {
        max_upload_bytes: state.config.max_upload_bytes,
        payments: state.config.mpesa.is_some(),
        explorer_tx_url: state.config.explorer_tx_url.clone(),
    })
}

#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "The event store answers. `storage` reports the blob store: `backend` (`local`, or `s3:<bucket>`) and, with a remote store, its state (`remote`: ok, unreachable, unauthorized, bucket_missing), the blobs waiting to be copied (`pending`) and the dead letters (`dead_letters`). A remote store that is down does not fail readiness: uploads are kept locally meanwhile. `integrations` lists each configured publisher (`nats`: `status` `ok`, or `down` while its last attempts failed; `lag`, events of the log it has not yet published; `failures`, attempts failed in a row) and each background worker (`storage`, `chain`, `mpesa`: `status` `ok`, `degraded` with dead letters waiting, or `down` while its outside service is down or its rounds fail; `active`, whether this instance is the one working; `lag`, its jobs waiting; `dead_letters`; `failures`), and the webhooks, always (`webhooks`: `status` `ok`, `degraded` while some receivers fail or dead letters wait, or `down` while every webhook this instance delivers is failing; `webhooks`, how many are registered; `active`, how many this instance delivers; `failing`, those whose last attempts failed; `lag`, the most log positions a webhook is behind; `dead_letters`, events parked for a replay); one that is down does not fail readiness either."),
              (status = 503, description = "The event store does not answer", body = crate::problem::Details, content_type = "application/problem+json")))]
pub async fn readyz(state: Data<AppState>) -> Result<HttpResponse, Problem> {
    match state.store.ping().await {
        Ok(()) => Ok(HttpResponse::Ok().json(serde_json::json!({
            "status": "ready",
            "storage": storage_report(&state).await,
            "integrations": integrations_report(&state).await,
        }))),
        Err(error) => {
            tracing::warn!(error = format!("{error:#}"), "not ready");
            Err(Problem::store_unavailable())
        }
    }
}

/// The publishers among the log consumers, the background workers and the webhooks, as
/// `/readyz` reports them. Read without waiting on them: a publisher stalled by its
/// outage may hold its batch for a while, a deliverer its attempt.
async fn integrations_report(state: &AppState) -> serde_json::Value {
    let mut report = serde_json::Map::new();
    for publisher in publisher_reports(state).await {
        report.insert(
            publisher.name.to_owned(),
            serde_json::json!({
                "status": publisher.status(),
                "lag": publisher.lag,
                "failures": publisher.failures,
            }),
        );
    }
    let counts = match eventstore::jobs::counts(state.store.any_pool()).await {
        Ok(counts) => counts,
        Err(error) => {
            tracing::warn!(error = format!("{error:#}"), "counting jobs");
            Vec::new()
        }
    };
    for (name, worker) in &state.workers {
        let status = worker_status(worker).await;
        let (mut pending, mut dead) = (0, 0);
        for count in counts.iter().filter(|c| c.worker == *name) {
            match count.state.as_str() {
                "dead" => dead += count.jobs,
                _ => pending += count.jobs,
            }
        }
        report.insert(
            (*name).to_owned(),
            serde_json::json!({
                "status": health(status.as_ref(), dead),
                "active": status.map(|s| s.active),
                "lag": pending,
                "dead_letters": dead,
                "failures": status.map(|s| s.failures),
            }),
        );
    }
    // Always listed: webhooks need no configuration (with none registered, `ok`).
    let webhooks = state.webhooks.report().await;
    report.insert(
        "webhooks".to_owned(),
        serde_json::json!({
            "status": webhooks.status,
            "webhooks": webhooks.webhooks,
            "active": webhooks.active,
            "failing": webhooks.failing,
            "lag": webhooks.lag,
            "dead_letters": webhooks.dead_letters,
        }),
    );
    serde_json::Value::Object(report)
}

/// A worker's state, asked of its driver (which answers at once, even mid-round).
async fn worker_status(
    worker: &actix::Recipient<eventstore::work::Status>,
) -> Option<eventstore::work::WorkerStatus> {
    let asked = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        worker.send(eventstore::work::Status),
    );
    asked.await.ok().and_then(Result::ok)
}

/// `down` while the outside service is down (or the worker's rounds fail, or it does
/// not answer); `degraded` with dead letters waiting for an operator; else `ok`.
fn health(status: Option<&eventstore::work::WorkerStatus>, dead_letters: i64) -> &'static str {
    match status {
        Some(s) if s.outage || s.failures > 0 => "down",
        None => "down",
        Some(_) if dead_letters > 0 => "degraded",
        Some(_) => "ok",
    }
}

async fn storage_report(state: &AppState) -> serde_json::Value {
    let Some(backend) = state.storage.backend() else {
        return serde_json::json!({"backend": "local"});
    };
    let remote = state
        .storage
        .remote_state()
        .await
        .map(|s| s.as_str())
        .unwrap_or("unknown");
    let (mut pending, mut dead) = (0, 0);
    match chain_adapter::storage::queue::counts(state.store.any_pool()).await {
        Ok(counts) => {
            for count in counts.iter().filter(|c| c.backend == backend) {
                match count.state.as_str() {
                    "dead" => dead += count.jobs,
                    _ => pending += count.jobs,
                }
            }
        }
        Err(error) => tracing::warn!(error = format!("{error:#}"), "counting storage jobs"),
    }
    serde_json::json!({
        "backend": backend,
        "remote": remote,
        "pending": pending,
        "dead_letters": dead,
    })
}

/// A publisher of the log (NATS) as `/readyz` and `/metrics` report it.
struct PublisherReport {
    /// As shown: `nats`.
    name: &'static str,
    /// Batches failed in a row (0 once one is published).
    failures: u32,
    /// Positions still to publish: the stored checkpoint, which the active instance
    /// moves (this one may be on standby), against the log's end. `None`: unknown.
    lag: Option<i64>,
}

impl PublisherReport {
    fn status(&self) -> &'static str {
        if self.failures == 0 {
            "ok"
        } else {
            "down"
        }
    }
}

/// The configured publishers among the log consumers, read without waiting on them.
async fn publisher_reports(state: &AppState) -> Vec<PublisherReport> {
    let publishers = [("nats", nats_publisher::CONSUMER_NAME)];
    let mut reports = Vec::new();
    for (shown, name) in publishers {
        let Some((_, handle)) = state.consumers.iter().find(|(n, _)| n == name) else {
            continue;
        };
        let pool = state.store.any_pool();
        let lag = match (
            eventstore::consumer::load_checkpoint(pool, name).await,
            state.store.log_end().await,
        ) {
            (Ok(done), Ok(end)) => Some((end.position - done.position).max(0)),
            _ => None,
        };
        reports.push(PublisherReport {
            name: shown,
            failures: handle.failures(),
            lag,
        });
    }
    reports
}

/// The publishers' gauges: up (1) or down (0) as `/readyz` says, lag and failures.
fn publisher_gauges(reports: &[PublisherReport]) -> String {
    let mut out = String::new();
    if reports.is_empty() {
        return out;
    }
    out.push_str("# HELP afyachain_publisher_up Whether a publisher of the log (nats) publishes (1) or is down (0), as /readyz reports it.\n# TYPE afyachain_publisher_up gauge\n");
    for report in reports {
        let up = u8::from(report.status() == "ok");
        out.push_str(&format!(
            "afyachain_publisher_up{{publisher=\"{}\"}} {up}\n",
            report.name
        ));
    }
    out.push_str("# HELP afyachain_publisher_lag Log positions a publisher has still to publish.\n# TYPE afyachain_publisher_lag gauge\n");
    for report in reports {
        if let Some(lag) = report.lag {
            out.push_str(&format!(
                "afyachain_publisher_lag{{publisher=\"{}\"}} {lag}\n",
                report.name
            ));
        }
    }
    out.push_str("# HELP afyachain_publisher_failures A publisher's batches failed in a row.\n# TYPE afyachain_publisher_failures gauge\n");
    for report in reports {
        out.push_str(&format!(
            "afyachain_publisher_failures{{publisher=\"{}\"}} {}\n",
            report.name, report.failures
        ));
    }
    out
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn metrics(state: Data<AppState>) -> HttpResponse {
    let mut body = state.metrics.render(&state.consumers);
    match eventstore::jobs::counts(state.store.any_pool()).await {
        Ok(counts) => {
            body.push_str("# HELP afyachain_jobs Jobs of each background worker waiting (pending, or a worker's own state) and dead letters (dead).\n# TYPE afyachain_jobs gauge\n");
            for count in counts {
                body.push_str(&format!(
                    "afyachain_jobs{{worker=\"{}\",kind=\"{}\",state=\"{}\"}} {}\n",
                    count.worker.replace(['\\', '"', '\n'], "_"),
                    count.kind.replace(['\\', '"', '\n'], "_"),
                    count.state.replace(['\\', '"', '\n'], "_"),
                    count.jobs
                ));
            }
        }
        Err(error) => tracing::warn!(error = format!("{error:#}"), "counting jobs"),
    }
    if !state.workers.is_empty() {
        let mut statuses = Vec::with_capacity(state.workers.len());
        for (name, worker) in &state.workers {
            statuses.push((*name, worker_status(worker).await));
        }
        body.push_str("# HELP afyachain_worker_up Whether a background worker's outside service answers (1) or is down (0).\n# TYPE afyachain_worker_up gauge\n");
        for (name, status) in &statuses {
            let up = status.is_some_and(|s| !s.outage && s.failures == 0);
            body.push_str(&format!(
                "afyachain_worker_up{{worker=\"{name}\"}} {}\n",
                u8::from(up)
            ));
        }
        body.push_str("# HELP afyachain_worker_active Whether this instance is the active one of a worker.\n# TYPE afyachain_worker_active gauge\n");
        for (name, status) in &statuses {
            let active = status.is_some_and(|s| s.active);
            body.push_str(&format!(
                "afyachain_worker_active{{worker=\"{name}\"}} {}\n",
                u8::from(active)
            ));
        }
    }
    body.push_str(&publisher_gauges(&publisher_reports(&state).await));
    body.push_str(&crate::metrics::webhooks(&state.webhooks.report().await));
    if state.storage.backend().is_some() {
        match chain_adapter::storage::queue::counts(state.store.any_pool()).await {
            Ok(counts) => {
                body.push_str("# HELP afyachain_storage_jobs Blobs waiting to be copied to remote storage (pending) and dead letters (dead).\n# TYPE afyachain_storage_jobs gauge\n");
                for count in counts {
                    body.push_str(&format!(
                        "afyachain_storage_jobs{{backend=\"{}\",state=\"{}\"}} {}\n",
                        count.backend.replace(['\\', '"', '\n'], "_"),
                        count.state,
                        count.jobs
                    ));
                }
            }
            Err(error) => tracing::warn!(error = format!("{error:#}"), "counting storage jobs"),
        }
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body)
}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "This document (OpenAPI 3.1)")))]
pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok().json(crate::openapi::ApiDoc::openapi())
}
