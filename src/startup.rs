//! Building and running the HTTP application: state, middleware, routes and the listener.

use crate::clock::{Clock, SystemClock};
use crate::config::Settings;
use crate::db::Db;
use crate::mpi::Mpi;
use crate::{api, telemetry};
use actix_web::dev::Server;
use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpServer};
use std::net::TcpListener;
use std::sync::Arc;

/// What every handler and job can reach.
pub struct AppState {
    pub db: Db,
    pub settings: Arc<Settings>,
    pub clock: Arc<dyn Clock>,
    pub mpi: Arc<dyn Mpi>,
    pub outbound: crate::notify::deliver::Outbound,
    /// Wakes the `deliver` job when a notification is written.
    pub deliver_wakeup: Arc<tokio::sync::Notify>,
    /// Names this process in delivery leases.
    pub instance_id: String,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// `delivery.retry_schedule`, parsed once.
    pub retry_schedule: Vec<std::time::Duration>,
    /// Recently seen API keys (by hash) with their organisation's region, for at most `KEY_CACHE_SECS`; emptied
    /// in this process by any key or organisation change.
    pub keys: moka::sync::Cache<String, (crate::db::models::ApiKeyRow, crate::db::models::KeyOrg)>,
}

/// How long a key stays cached: a key revoked through another instance stops working within this.
pub const KEY_CACHE_SECS: u64 = 10;

impl AppState {
    /// Opens the database (running migrations) and builds the MPI router.
    pub fn new(settings: Settings, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let db = Db::connect(&settings.database)?;
        let applied = db.migrate()?;
        tracing::info!(backend = db.backend_name(), applied, "database ready");
        if db.autovacuum_off()? {
            tracing::warn!(
                "PostgreSQL's autovacuum is off: the planner's statistics go stale as tables grow, and lookups \
                 can turn into scans of whole tables; turn it on, or run VACUUM ANALYZE often (README, Operations)"
            );
        }
        let mpi = Arc::new(crate::mpi::from_settings(&settings.mpi, db.clone())?);
        let (mailer, mail_domain): (Arc<dyn crate::notify::email::Mailer>, String) =
            if settings.mail.host.is_empty() {
                (
                    Arc::new(crate::notify::email::NoMailer),
                    "cpis.invalid".into(),
                )
            } else {
                let m = crate::notify::email::SmtpMailer::new(&settings.mail)?;
                let domain = m.domain();
                (Arc::new(m), domain)
            };
        let webhooks = Arc::new(crate::notify::webhook::HttpWebhookClient::new(
            &settings.webhook,
        )?);
        let retry_schedule = settings.delivery.schedule()?;
        let mail_sessions = Arc::new(tokio::sync::Semaphore::new(
            settings.mail.max_connections as usize,
        ));
        let webhook_sessions =
            crate::notify::deliver::WebhookSessions::new(settings.webhook.max_connections as usize);
        let metrics = crate::metrics::Metrics::new();
        metrics.register_db(&db);
        Ok(AppState {
            db,
            settings: Arc::new(settings),
            clock,
            mpi,
            outbound: crate::notify::deliver::Outbound {
                mailer,
                webhooks,
                mail_domain,
                mail_sessions,
                webhook_sessions,
            },
            deliver_wakeup: Arc::new(tokio::sync::Notify::new()),
            instance_id: uuid::Uuid::new_v4().to_string(),
            metrics: Arc::new(metrics),
            retry_schedule,
            keys: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(std::time::Duration::from_secs(KEY_CACHE_SECS))
                .build(),
        })
    }

    /// Tells the `deliver` job there is work, without waiting for its next tick.
    pub fn wake_deliverer(&self) {
        self.deliver_wakeup.notify_one();
    }
}

pub struct Application {
    port: u16,
    server: Server,
}

impl Application {
    /// Opens the database, runs migrations, binds the listener (port 0 picks a free one).
    pub fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::build_with_clock(settings, Arc::new(SystemClock))
    }

    pub fn build_with_clock(settings: Settings, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind((settings.server.host.as_str(), settings.server.port))
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen on {}:{}: {e}",
                    settings.server.host,
                    settings.server.port
                )
            })?;
        let port = listener.local_addr()?.port();
        let workers = match settings.server.workers {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            n => n,
        };
        let state = web::Data::new(AppState::new(settings, clock)?);
        crate::jobs::spawn(state.clone().into_inner())?;
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .configure(api::configure)
                .default_service(web::to(api::not_found))
                .wrap(api::problem_errors())
                .wrap(from_fn(telemetry::request_span))
        })
        .workers(workers)
        .listen(listener)?
        .run();
        tracing::info!(port, "listening on {}", port);
        Ok(Self { port, server })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}
