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

#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "The event store answers"),
              (status = 503, description = "The event store does not answer", body = crate::problem::Details, content_type = "application/problem+json")))]
pub async fn readyz(state: Data<AppState>) -> Result<HttpResponse, Problem> {
    match state.store.ping().await {
        Ok(()) => Ok(HttpResponse::Ok().json(serde_json::json!({"status": "ready"}))),
        Err(error) => {
            tracing::warn!(error = format!("{error:#}"), "not ready");
            Err(Problem::new(
                actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
                "store_unreachable",
                "the event store is not reachable",
            ))
        }
    }
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn metrics(state: Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render(&state.consumers))
}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "This document (OpenAPI 3.1)")))]
pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok().json(crate::openapi::ApiDoc::openapi())
}
