//! The HTTP server.

use std::net::TcpListener;

use actix_web::{web, HttpResponse, HttpServer};
use eventstore::Store;

use crate::app::App;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
}

/// Serves until SIGINT/SIGTERM: stops accepting, lets in-flight requests finish, then
/// stops the consumers after their current batch.
pub async fn run(app: App, listener: TcpListener) -> anyhow::Result<()> {
    let state = AppState {
        store: app.store.clone(),
    };
    let addr = listener.local_addr()?;
    let server = HttpServer::new(move || {
        actix_web::App::new()
            .app_data(web::Data::new(state.clone()))
            .configure(routes)
    })
    .shutdown_timeout(30)
    .listen(listener)?
    .run();
    tracing::info!(%addr, backend = app.store.backend().as_str(), "afyachain listening");
    server.await?;
    tracing::info!("shutting down: checkpointing consumers");
    app.shutdown().await;
    Ok(())
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz));
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    match state.store.ping().await {
        Ok(()) => HttpResponse::Ok().json(serde_json::json!({"status": "ready"})),
        Err(error) => {
            tracing::warn!(error = format!("{error:#}"), "not ready");
            HttpResponse::ServiceUnavailable()
                .content_type("application/problem+json")
                .json(serde_json::json!({
                    "type": "about:blank",
                    "title": "Service Unavailable",
                    "status": 503,
                    "detail": "the event store is not reachable"
                }))
        }
    }
}
