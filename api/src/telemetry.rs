//! Logging: structured, to stderr, filtered by `RUST_LOG` (default `info`). Every
//! request gets a request id (answered in `X-Request-Id`) and one log line with its
//! method, route pattern, status and duration. Spans and logs carry only opaque ids:
//! never a name, phone number, password, token, query string or record content.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::web::Data;
use actix_web::HttpMessage;
use tracing::Instrument;
use tracing_subscriber::EnvFilter;
use uuid::Uuid;

use crate::extract::RequestId;
use crate::metrics::Metrics;

pub fn init() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,actix_server=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Middleware: request id, a span for the request, one log line and the metrics.
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let request_id = Uuid::new_v4();
    req.extensions_mut().insert(RequestId(request_id));
    let metrics = req.app_data::<Data<Metrics>>().cloned();
    // Clients choose the method: only known ones become labels.
    let method = match req.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS") => m,
        _ => "other",
    }
    .to_owned();
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        method = %method,
        route = tracing::field::Empty
    );
    let started = Instant::now();
    let mut res = next.call(req).instrument(span.clone()).await?;
    let route = res
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    let status = res.status().as_u16();
    let took = started.elapsed();
    if let Ok(value) = HeaderValue::from_str(&request_id.to_string()) {
        res.headers_mut()
            .insert(HeaderName::from_static("x-request-id"), value);
    }
    span.record("route", route.as_str());
    span.in_scope(|| {
        tracing::info!(status, ms = took.as_millis() as u64, "request");
    });
    if let Some(metrics) = metrics {
        metrics.record(&method, &route, status, took);
    }
    Ok(res)
}
