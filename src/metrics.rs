//! Prometheus metrics: requests by route and status with latency, checks by outcome, matches by status,
//! notifications by state (read at scrape time), delivery attempts and latency, job runs and durations, and
//! what each purge removed, and log lines dropped. Labels carry routes and codes, never identifiers.

use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub checks: IntCounterVec,
    pub matches: IntCounterVec,
    pub notifications: IntGaugeVec,
    pub delivery_attempts: IntCounterVec,
    pub delivery_seconds: HistogramVec,
    pub job_runs: IntCounterVec,
    pub job_seconds: HistogramVec,
    pub purged: IntCounterVec,
    /// Log lines dropped because standard error fell behind ([`crate::telemetry::dropped_lines`], read at
    /// scrape time).
    log_lines_dropped: IntCounter,
}

/// `metric`, registered with `registry`.
fn registered<C: Collector + Clone + 'static>(registry: &Registry, metric: C) -> C {
    registry
        .register(Box::new(metric.clone()))
        .expect("registered once");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    registered(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    registered(
        registry,
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
            .expect("valid metric"),
    )
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("cpis".into()), None).expect("valid registry");
        let latency = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
        ];
        let notifications = registered(
            &registry,
            IntGaugeVec::new(
                Opts::new("notifications", "Notifications by state"),
                &["state"],
            )
            .expect("valid metric"),
        );
        Self {
            requests: counter(
                &registry,
                "http_requests_total",
                "HTTP requests by route, method and status",
                &["route", "method", "status"],
            ),
            request_seconds: histogram(
                &registry,
                "http_request_duration_seconds",
                "HTTP request latency by route",
                &["route"],
                latency.clone(),
            ),
            checks: counter(
                &registry,
                "flag_checks_total",
                "Flag checks by outcome (hit, possible_hit, miss) and access",
                &["outcome", "access"],
            ),
            matches: counter(
                &registry,
                "mpi_matches_total",
                "MPI resolutions by status and method",
                &["status", "method"],
            ),
            notifications,
            delivery_attempts: counter(
                &registry,
                "delivery_attempts_total",
                "Delivery attempts by channel and outcome",
                &["channel", "outcome"],
            ),
            delivery_seconds: histogram(
                &registry,
                "delivery_duration_seconds",
                "Time to send one delivery, by channel",
                &["channel"],
                latency.clone(),
            ),
            job_runs: counter(
                &registry,
                "job_runs_total",
                "Scheduled job runs by job and result",
                &["job", "result"],
            ),
            job_seconds: histogram(
                &registry,
                "job_duration_seconds",
                "Scheduled job run time",
                &["job"],
                latency,
            ),
            purged: counter(
                &registry,
                "purged_total",
                "Records removed or cleared by the purge job, by kind",
                &["kind"],
            ),
            log_lines_dropped: registered(
                &registry,
                IntCounter::new(
                    "log_lines_dropped_total",
                    "Log lines dropped because standard error could not take them as fast as they came",
                )
                .expect("valid metric"),
            ),
            registry,
        }
    }

    /// Adds the database writer's counters (batches committed, writes carried, WAL syncs on SQLite).
    pub fn register_db(&self, db: &crate::db::Db) {
        for c in [&db.stats.batches, &db.stats.writes, &db.stats.syncs] {
            // Registered once per process; a second state over the same database (tests) keeps the first.
            let _ = self.registry.register(Box::new(c.clone()));
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let dropped = crate::telemetry::dropped_lines();
        let counted = self.log_lines_dropped.get();
        if dropped > counted {
            self.log_lines_dropped.inc_by(dropped - counted);
        }
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding cannot fail");
        String::from_utf8(buffer).expect("Prometheus text is UTF-8")
    }
}
