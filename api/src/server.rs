//! The HTTP server: shared state, middleware and the routes.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::ServiceResponse;
use actix_web::http::header;
use actix_web::middleware::{from_fn, ErrorHandlerResponse, ErrorHandlers};
use actix_web::web::{self, Data};
use actix_web::{HttpServer, ResponseError};
use chain_adapter::storage::Storage;
use commands::Commands;
use eventstore::{ConsumerHandle, Store};

use crate::app::App;
use crate::config::Config;
use crate::consistency::ReadYourWrites;
use crate::metrics::Metrics;
use crate::problem::Problem;
use crate::ratelimit::Limits;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Store,
    pub commands: Arc<Commands>,
    pub settle: Arc<ReadYourWrites>,
    /// Attempt limits, kept in the store (shared by every instance on it).
    pub limits: Arc<Limits>,
    /// The Daraja client a success callback is checked with (STK Push Query), when
    /// M-Pesa is configured.
    pub daraja: Option<Arc<mpesa_adapter::daraja::Daraja>>,
    /// The memory upload bodies may hold once whole, per account and overall.
    pub uploads: Arc<crate::extract::UploadBudget>,
    /// The disk upload bodies may fill while they arrive (see `UploadBudget`).
    pub spools: Arc<crate::extract::UploadBudget>,
    /// This process's folder of upload spools.
    pub spool_dir: Arc<commands::spool::SpoolDir>,
    pub metrics: Arc<Metrics>,
    /// The projections this process runs, by name.
    pub consumers: Vec<(String, ConsumerHandle)>,
    /// The background workers this process runs (`storage`, `chain`, `mpesa`), for
    /// `/readyz` and `/metrics`.
    pub workers: Vec<(&'static str, actix::Recipient<eventstore::work::Status>)>,
    /// Where blobs are kept (for `storage_status` and `/readyz`).
    pub storage: Storage,
    /// The live tail of the event streams.
    pub live: crate::live::LiveLog,
    /// The webhook deliverers (woken after a replay request).
    pub webhooks: Arc<crate::webhooks::WebhookSupervisor>,
    /// Open event streams per integrator key.
    pub streams: Arc<std::sync::Mutex<std::collections::HashMap<domain::ids::IntegratorId, usize>>>,
}

impl AppState {
    /// The state the routes share; makes this process's upload spool folder (and
    /// removes those a crash left behind).
    pub fn new(app: &App) -> anyhow::Result<AppState> {
        let handles: Vec<ConsumerHandle> = app.projections.iter().map(|(_, h)| h.clone()).collect();
        let names = app.projections.iter().map(|(n, _)| n.clone()).collect();
        let (spool_dir, removed) = commands::spool::SpoolDir::open(&app.config.data_dir)?;
        if removed > 0 {
            tracing::info!(
                removed,
                "removed the upload spools of processes that are gone"
            );
        }
        Ok(AppState {
            config: Arc::new(app.config.clone()),
            store: app.store.clone(),
            commands: app.commands.clone(),
            settle: Arc::new(ReadYourWrites::new(
                app.store.clone(),
                handles,
                names,
                app.config.consistency_timeout,
            )),
            limits: Arc::new(Limits::new(app.store.clone(), app.commands.clone())),
            daraja: crate::routes::payments::callback_client(&app.config),
            uploads: Arc::new(crate::extract::UploadBudget::new(
                app.config.bodies.upload_memory_bytes,
                app.config.max_upload_bytes,
                app.config.bodies.upload_wait,
            )),
            spools: Arc::new(crate::extract::UploadBudget::new(
                app.config.bodies.upload_spool_bytes,
                app.config.bodies.upload_spool_account_bytes,
                app.config.bodies.upload_wait,
            )),
            spool_dir: Arc::new(spool_dir),
            metrics: Arc::new(Metrics::default()),
            consumers: app.consumers.clone(),
            workers: app.workers(),
            storage: app.storage.clone(),
            live: app.live.clone(),
            webhooks: app.webhooks.clone(),
            streams: Arc::default(),
        })
    }
}

/// Serves until SIGINT/SIGTERM: stops accepting, lets in-flight requests finish, then
/// stops the consumers after their current batch.
pub async fn run(app: App, listener: TcpListener) -> anyhow::Result<()> {
    let state = AppState::new(&app)?;
    let addr = listener.local_addr()?;
    // Our own signal handlers, in place before the server says it is listening: a
    // SIGTERM right after start must still stop it gracefully.
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let server =
        HttpServer::new(move || {
            actix_web::App::new()
                .app_data(Data::new(state.clone()))
                .app_data(Data::from(state.metrics.clone()))
                .app_data(web::QueryConfig::default().error_handler(|error, _| {
                    Problem::field("query", format!("the query string is invalid: {error}")).into()
                }))
                .app_data(web::PathConfig::default().error_handler(|_, _| {
                    Problem::not_found("not_found", "no such resource").into()
                }))
                .configure(crate::routes::configure)
                .configure(crate::web::configure)
                .default_service(web::to(|| async {
                    Problem::not_found("route_not_found", "no such resource").error_response()
                }))
                .wrap(ErrorHandlers::new().default_handler(as_problem))
                .wrap(from_fn(crate::telemetry::observe))
        })
        .disable_signals()
        .shutdown_timeout(30)
        .listen(listener)?
        .run();
    let handle = server.handle();
    let live = app.live.clone();
    actix_rt::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("stop signal received");
        // Event streams never end by themselves: end them so the shutdown is graceful.
        live.stop();
        handle.stop(true).await;
    });
    tracing::info!(%addr, backend = app.store.backend().as_str(), "afyachain listening");
    server.await?;
    tracing::info!("shutting down: checkpointing consumers");
    app.shutdown().await;
    Ok(())
}

/// Errors answered by the framework itself (405, a payload it refused) become problem
/// details too; ours already are.
fn as_problem<B: MessageBody>(
    res: ServiceResponse<B>,
) -> actix_web::Result<ErrorHandlerResponse<B>> {
    let is_problem = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/problem+json"));
    if is_problem {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let status = res.status();
    let (code, detail) = match status.as_u16() {
        404 => ("route_not_found", "no such resource"),
        405 => (
            "method_not_allowed",
            "this resource does not accept that method",
        ),
        413 => ("body_too_large", "the body is too large"),
        400 => ("bad_request", "the request could not be understood"),
        _ if status.is_server_error() => ("internal_error", "something went wrong on our side"),
        _ => ("error", "the request was refused"),
    };
    let (req, _) = res.into_parts();
    let response = Problem::new(status, code, detail).error_response();
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(req, response).map_into_right_body::<B>(),
    ))
}
