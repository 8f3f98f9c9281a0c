//! The cpis benchmark (`cargo bench --bench load -- [options]`): seeds a database of a chosen size, starts the
//! real `cpis serve` (release build) as its own process, drives HTTP load from this process, and prints
//! throughput and latency percentiles for flag checks that hit and miss, attendances, bulk import and
//! notification delivery, each beside a reference measured in the same run (`GET /health/live` under the same
//! load for HTTP, run before the first HTTP scenario and again after each, each scenario compared with the two
//! runs either side of it; the database's own multi-row insert of the same rows for imports) and its ratio to it.

#[path = "../tests/api/receiver.rs"]
#[allow(dead_code)]
mod receiver;
#[path = "../tests/api/smtp.rs"]
#[allow(dead_code)]
mod smtp;

use clap::Parser;
use cpis::attendances::AttendanceRow;
use cpis::config::Settings;
use cpis::db::models::{AccessRow, PlanRow};
use cpis::db::Db;
use cpis::mpi::builtin::PersonRow;
use cpis::mpi::synthetic::{Generator, NhsNumbers, Person};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser, Clone)]
struct Args {
    /// `sqlite` or `postgres`.
    #[arg(long, default_value = "sqlite")]
    backend: String,
    /// Server for `--backend postgres`; a fresh database is made on it and dropped afterwards.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    postgres_url: String,
    /// Persons in the index, each with one plan.
    #[arg(long, default_value_t = 1_200_000)]
    persons: usize,
    /// Past attendances seeded.
    #[arg(long, default_value_t = 5_000_000)]
    attendances: usize,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// The server's log level: `info`, as cpis ships (a line for every request), or `warn` as the benchmark ran
    /// until the nineteenth session.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Seconds of load per HTTP scenario.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rows in the bulk import file.
    #[arg(long, default_value_t = 100_000)]
    import_rows: usize,
    /// Notifications in the delivery backlog.
    #[arg(long, default_value_t = 5_000)]
    notifications: usize,
    /// On PostgreSQL, gathers the planner's statistics for the tables the seed filled once it is in (`VACUUM
    /// ANALYZE` of persons, plans, attendances, accesses and organisations), as autovacuum does for a database
    /// in service and PostgreSQL's manual advises after a bulk load. This machine's PostgreSQL has autovacuum off
    /// (`conf.d/90-ci.conf`), so without it every statement is planned with no statistics at all, as the
    /// benchmark ran until the twenty-third session (`--analyze false`). The tables the seed leaves empty are
    /// not analysed: autovacuum would analyse them again as they grow, and with statistics saying "empty" and
    /// no autovacuum, PostgreSQL keeps planning a scan of the whole table as it fills (BENCHMARKS.md).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    analyze: bool,
    /// Scenarios to run, comma-separated, from `hit,miss,attendance,import,delivery` (the reference always runs).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "hit,miss,attendance,import,delivery"
    )]
    scenarios: Vec<String>,
}

impl Args {
    fn runs(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s == scenario)
    }

    fn on_postgres(&self) -> bool {
        self.backend == "postgres"
    }
}

struct Target {
    url: String,
    pg: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

fn target(args: &Args) -> Target {
    if args.on_postgres() {
        use diesel::connection::SimpleConnection;
        use diesel::Connection;
        let name = format!("cpis_bench_{}", std::process::id());
        // Before the first PostgreSQL connection, as cpis does: OpenSSL without its exit-time clean-up.
        cpis::db::prepare_libpq();
        let mut admin =
            diesel::PgConnection::establish(&args.postgres_url).expect("connect to PostgreSQL");
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let base = args
            .postgres_url
            .rsplit_once('/')
            .map(|(b, _)| b)
            .unwrap_or(&args.postgres_url);
        Target {
            url: format!("{base}/{name}"),
            pg: Some((args.postgres_url.clone(), name)),
            _dir: None,
        }
    } else {
        let dir = tempfile::tempdir_in(
            std::env::var("CPIS_BENCH_DIR").unwrap_or_else(|_| "target".into()),
        )
        .unwrap();
        Target {
            url: format!("sqlite://{}", dir.path().join("bench.db").display()),
            pg: None,
            _dir: Some(dir),
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some((base, name)) = &self.pg {
            use diesel::connection::SimpleConnection;
            use diesel::Connection;
            if let Ok(mut admin) = diesel::PgConnection::establish(base) {
                let _ =
                    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        }
    }
}

const LA: &str = "E08000025";
const ED: &str = "RXK01";

fn plan_row(p: &Person, la: &str, reference: String, now: chrono::NaiveDateTime) -> PlanRow {
    PlanRow {
        id: uuid::Uuid::new_v4().to_string(),
        la_ods: la.into(),
        local_reference: reference,
        nhs_number: p.nhs_number.clone(),
        plan_type: "CPP".into(),
        start_date: p
            .birth_date
            .max(chrono::NaiveDate::from_ymd_opt(2025, 1, 1).unwrap())
            .into(),
        end_date: None,
        delete_date: None,
        expected_delivery_date: None,
        given_name: Some(p.given_name.clone()),
        family_name: Some(p.family_name.clone()),
        birth_date: Some(p.birth_date.into()),
        sex: Some(p.sex.to_string()),
        postcode: Some(p.postcode.clone()),
        office_phone: None,
        emergency_duty_phone: None,
        email: None,
        version: 1,
        created_at: now.into(),
        updated_at: now.into(),
        ended_at: None,
    }
}

/// Seeds organisations, keys, persons with plans, and past attendances. Answers the keys and the flagged people.
fn seed(db: &Db, args: &Args) -> (String, String, String, Vec<String>) {
    use cpis::audit::Actor;
    let now = chrono::Utc::now().naive_utc();
    let started = Instant::now();
    let keys = db
        .write_blocking(|conn| {
            for (ods, name, kind) in [(LA, "Birmingham City Council", "local_authority"), (ED, "Sandwell ED", "care_setting"), ("X26", "ops", "other")] {
                let body = serde_json::json!({"ods_code": ods, "name": name, "kind": kind, "region": "BSOL",
                                              "office_phone": "0121 303 1888", "emergency_duty_phone": "0121 675 4806"});
                cpis::api::store_organisation(conn, now, &Actor::cli(), cpis::api::parse_organisation(body)?)?;
            }
            let mut key = |org: &str, role| cpis::api::create_key(conn, now, &Actor::cli(), &cpis::domain::OdsCode::parse(org).unwrap(), &[role]).map(|k| k.1);
            Ok::<_, cpis::error::ApiError>((key(LA, cpis::auth::Role::SocialCare)?, key(ED, cpis::auth::Role::CareSetting)?, key("X26", cpis::auth::Role::Admin)?))
        })
        .map_err(|e| anyhow::anyhow!("{}", e.detail()))
        .unwrap();
    let mut generator = Generator::new(11, chrono::Utc::now().date_naive());
    let mut flagged = Vec::with_capacity(args.persons);
    let mut done = 0;
    while done < args.persons {
        let n = (args.persons - done).min(20_000);
        let people = generator.population(n);
        let mut persons: Vec<PersonRow> = people.iter().map(|p| p.person_row(now)).collect();
        let plans: Vec<PlanRow> = people
            .iter()
            .enumerate()
            .map(|(i, p)| plan_row(p, LA, format!("SEED-{}", done + i), now))
            .collect();
        db.write_blocking(|conn| {
            cpis::mpi::builtin::insert_persons(conn, &mut persons)?;
            for chunk in plans.chunks(500) {
                cpis::db::insert_plans(conn, chunk)?;
            }
            Ok::<_, cpis::db::DbError>(())
        })
        .unwrap();
        flagged.extend(people.into_iter().map(|p| p.nhs_number));
        done += n;
    }
    let seeded_people = started.elapsed();
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut done = 0;
    while done < args.attendances {
        let n = (args.attendances - done).min(50_000);
        let rows: Vec<AttendanceRow> = (0..n)
            .map(|i| {
                let nhs = flagged[rng.random_range(0..flagged.len())].clone();
                let at = now - chrono::Duration::minutes(rng.random_range(60..60 * 24 * 365));
                AttendanceRow {
                    id: uuid::Uuid::new_v4().to_string(),
                    setting_ods: ED.into(),
                    attendance_id: format!("PAST-{}", done + i),
                    setting_type: "ED".into(),
                    arrived_at: at.into(),
                    reason: None,
                    nhs_number: Some(nhs.clone()),
                    identifier_system: None,
                    identifier_value: None,
                    given_name: None,
                    family_name: None,
                    birth_date: None,
                    sex: None,
                    postcode: None,
                    region: Some("BSOL".into()),
                    match_status: "matched".into(),
                    match_method: Some("nhs_number".into()),
                    match_score: Some(1.0),
                    person_id: None,
                    resolved_nhs_number: Some(nhs),
                    flagged: true,
                    rematch_attempts: 0,
                    key_id: None,
                    created_at: at.into(),
                    updated_at: at.into(),
                }
            })
            .collect();
        // cpis records an accepted attendance of a flagged child as one of the child's recent accesses too,
        // which a later check that hits reads back.
        let accesses: Vec<AccessRow> = rows
            .iter()
            .filter_map(|a| Some(a.access(a.resolved_nhs_number.clone()?)))
            .collect();
        db.write_blocking(|conn| {
            for chunk in rows.chunks(400) {
                cpis::db::insert_attendances(conn, chunk)?;
            }
            for chunk in accesses.chunks(500) {
                cpis::db::insert_accesses(conn, chunk)?;
            }
            Ok::<_, cpis::db::DbError>(())
        })
        .unwrap();
        done += n;
    }
    println!(
        "seeded {} persons with plans in {:.1} s and {} past attendances in {:.1} s",
        args.persons,
        seeded_people.as_secs_f64(),
        args.attendances,
        started.elapsed().as_secs_f64()
    );
    if args.on_postgres() && args.analyze {
        use diesel::connection::SimpleConnection;
        let started = Instant::now();
        let mut conn = db.get().expect("a connection");
        conn.batch_execute("VACUUM ANALYZE persons, plans, attendances, accesses, organisations")
            .expect("VACUUM ANALYZE");
        println!(
            "gathered PostgreSQL's statistics of the seeded tables (VACUUM ANALYZE) in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    (keys.0, keys.1, keys.2, flagged)
}

struct Server {
    child: Child,
    address: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server the benchmark runs: `CPIS_BENCH_SERVER`, or the `cpis` built with it.
fn server_binary() -> String {
    std::env::var("CPIS_BENCH_SERVER").unwrap_or_else(|_| env!("CARGO_BIN_EXE_cpis").into())
}

/// Starts `cpis serve` with JSON logs (the Dockerfile's format) at `log_level`; its start-up lines stay in, to
/// learn its port. The server is [`server_binary`]: another build can be measured under the same build of the
/// load generator.
fn serve(url: &str, log_level: &str, env: &[(&str, &str)]) -> Server {
    let mut child = Command::new(server_binary())
        .arg("serve")
        .env("CPIS_CONFIG_DIR", "/nonexistent")
        .env("CPIS__DATABASE__URL", url)
        .env("CPIS__SERVER__PORT", "0")
        .env("CPIS__LOG__FORMAT", "json")
        .env(
            "CPIS__LOG__LEVEL",
            format!("{log_level},cpis::startup=info"),
        )
        .env("CPIS__DATABASE__POOL_SIZE", "32")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cpis serve");
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let port = loop {
        let line = lines.next().expect("cpis serve exited").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if let Some(p) = v["port"].as_u64() {
            break p;
        }
    };
    // The server's warnings and errors are shown, so an error answer in the figures can be explained.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("\"level\":\"ERROR\"") || line.contains("\"level\":\"WARN\"") {
                eprintln!("server: {line}");
            }
        }
    });
    Server {
        child,
        address: format!("http://127.0.0.1:{port}"),
    }
}

/// The server's resident set now.
fn rss_mb(pid: u32) -> f64 {
    status_mb(pid, "VmRSS:")
}

/// A memory figure from `/proc/PID/status`, in MB (`VmRSS:` now, `VmHWM:` the peak since the process started).
fn status_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// CPU seconds used so far by process `pid`, all its threads (`utime` and `stime` of `/proc/PID/stat`, which
/// the kernel counts in USER_HZ, 100 a second).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name, in parentheses, may hold spaces: the fields are counted after its closing one, where
    // `utime` and `stime` (fields 14 and 15 of the line) are the 12th and 13th.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|field| field.parse::<f64>().ok())
        .sum::<f64>()
        / 100.0
}

/// CPU seconds of each PostgreSQL process on this machine (its backends, one per connection, and its own
/// background processes), by process id.
fn postgres_cpu() -> HashMap<u32, f64> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(|pid| (pid, cpu_secs(pid)))
        .collect()
}

/// The CPU that cpis (process `server`), the load generator and, on PostgreSQL, the database server's processes
/// use from `start` on.
struct CpuMeter {
    server: u32,
    at_start: (f64, f64),
    postgres_at_start: Option<HashMap<u32, f64>>,
    started: Instant,
}

impl CpuMeter {
    fn start(server: u32, postgres: bool) -> Self {
        CpuMeter {
            server,
            at_start: (cpu_secs(server), cpu_secs(std::process::id())),
            postgres_at_start: postgres.then(postgres_cpu),
            started: Instant::now(),
        }
    }

    /// The CPU per request over `requests` requests, and the cores each kept busy, as a table line (none without
    /// requests). PostgreSQL's figure counts the processes running at the end, from zero for those that started
    /// since (a process that ended in between is left out).
    fn line(&self, requests: f64) -> Option<String> {
        let wall = self.started.elapsed().as_secs_f64();
        let cpis = cpu_secs(self.server) - self.at_start.0;
        let generator = cpu_secs(std::process::id()) - self.at_start.1;
        let postgres = self.postgres_at_start.as_ref().map(|before| {
            postgres_cpu()
                .into_iter()
                .map(|(pid, now)| now - before.get(&pid).copied().unwrap_or(0.0))
                .sum::<f64>()
        });
        (requests > 0.0).then(|| {
            let database = postgres.map_or(String::new(), |pg| {
                format!(
                    ", PostgreSQL {:.0} µs ({:.2} cores busy)",
                    1e6 * pg / requests,
                    pg / wall
                )
            });
            format!(
                "|   (CPU per request: cpis {:.0} µs, load generator {:.0} µs{database}; cores busy: {cpis_cores:.2} and {generator_cores:.2}) | | | | | | |",
                1e6 * cpis / requests,
                1e6 * generator / requests,
                cpis_cores = cpis / wall,
                generator_cores = generator / wall,
            )
        })
    }
}

#[derive(Clone, Copy)]
struct Figures {
    per_sec: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    errors: usize,
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

/// `concurrency` clients sending requests made by `make` for `seconds`.
async fn load<F>(client: &reqwest::Client, concurrency: usize, seconds: u64, make: F) -> Figures
where
    F: Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let counter = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, make, counter, errors, latencies) = (
            client.clone(),
            make.clone(),
            counter.clone(),
            errors.clone(),
            latencies.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                match make(&client, n).send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        mine.push(t.elapsed());
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies.lock().unwrap().extend(mine);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut l = latencies.lock().unwrap().clone();
    l.sort();
    Figures {
        per_sec: l.len() as f64 / elapsed,
        p50: pct(&l, 0.5),
        p90: pct(&l, 0.9),
        p99: pct(&l, 0.99),
        errors: errors.load(Ordering::Relaxed),
    }
}

/// The server's group-commit counters: (transactions, writes).
async fn writer_counts(client: &reqwest::Client, base: &str) -> (f64, f64) {
    let text = match client.get(format!("{base}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("cpis_db_write_batches_total "),
        value("cpis_db_writes_total "),
    )
}

/// The HTTP scenarios of one benchmark run against one server, with their `GET /health/live` references. The
/// machine's speed drifts during a run (back-to-back references differed by a third or more on the twenty-eighth
/// session's machine), so a reference is measured before the first HTTP scenario and again after each one, and
/// each scenario is compared with the mean of the two references either side of it.
struct HttpRuns<'a> {
    client: &'a reqwest::Client,
    base: &'a str,
    /// The server's process id.
    server: u32,
    args: &'a Args,
    /// Every reference rate so far, in order.
    references: Vec<f64>,
    /// The server's largest resident set seen after a scenario, in MB.
    peak_rss: f64,
}

impl<'a> HttpRuns<'a> {
    /// Measures the first reference and prints it as its own row.
    async fn start(
        client: &'a reqwest::Client,
        base: &'a str,
        server: u32,
        args: &'a Args,
    ) -> Self {
        let mut runs = HttpRuns {
            client,
            base,
            server,
            args,
            references: Vec::new(),
            peak_rss: rss_mb(server),
        };
        let (f, cpu) = runs.reference().await;
        row("GET /health/live (reference)", f, None);
        print_lines(&cpu);
        runs.references.push(f.per_sec);
        runs
    }

    /// Runs one HTTP scenario, then the reference again, and prints the scenario's row (throughput as a share of
    /// the two references around it), the writer's commits per second and mean batch, and the CPU that cpis and
    /// the load generator used per request; then the new reference's row.
    async fn scenario<F>(&mut self, name: &str, make: F)
    where
        F: Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
    {
        let (client, base, args) = (self.client, self.base, self.args);
        let before = writer_counts(client, base).await;
        let (f, mut lines) = self.measure(make).await;
        let after = writer_counts(client, base).await;
        self.peak_rss = self.peak_rss.max(rss_mb(self.server));
        let (batches, writes) = (after.0 - before.0, after.1 - before.1);
        if batches > 0.0 {
            lines.push(format!(
                "|   (writer: {:.0} commits/s, {:.1} writes per commit) | | | | | | |",
                batches / args.seconds as f64,
                writes / batches
            ));
        }
        let (next, next_cpu) = self.reference().await;
        let previous = self.references.last().copied().unwrap_or(next.per_sec);
        row(name, f, Some((previous + next.per_sec) / 2.0));
        print_lines(&lines);
        row("GET /health/live (reference, again)", next, None);
        print_lines(&next_cpu);
        self.references.push(next.per_sec);
    }

    /// One run of the reference, with its CPU line.
    async fn reference(&self) -> (Figures, Vec<String>) {
        let b = self.base.to_string();
        self.measure(move |c, _| c.get(format!("{b}/health/live")))
            .await
    }

    /// One HTTP run of `make`'s requests, after a [`pause`], with the line of the CPU it took.
    async fn measure<F>(&self, make: F) -> (Figures, Vec<String>)
    where
        F: Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
    {
        pause().await;
        let args = self.args;
        let cpu = CpuMeter::start(self.server, args.on_postgres());
        let f = load(self.client, args.concurrency, args.seconds, make).await;
        let line = cpu.line(f.per_sec * args.seconds as f64);
        (f, line.into_iter().collect())
    }

    /// How far the references spread, and the largest resident set seen under load.
    fn finish(&self) {
        let (lo, hi) = self
            .references
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
        let runs: Vec<String> = self
            .references
            .iter()
            .map(|r| format!("{r:.0}/s"))
            .collect();
        println!(
            "\n`/health/live` runs: {} (the highest {:.0}% above the lowest)",
            runs.join(", "),
            100.0 * (hi / lo - 1.0)
        );
        println!(
            "\nserver resident set, peak seen under load: {:.0} MB",
            self.peak_rss
        );
    }
}

/// A second before each HTTP run, the references' and the scenarios' alike, so that neither starts while the
/// server is still finishing the run before it (the checkpointer copying a write scenario's pages, the log
/// thread writing out its lines).
async fn pause() {
    tokio::time::sleep(Duration::from_secs(1)).await;
}

fn print_lines(lines: &[String]) {
    for l in lines {
        println!("{l}");
    }
}

/// A table row; `reference` is the `/health/live` rate the scenario is compared with.
fn row(name: &str, f: Figures, reference: Option<f64>) {
    let ratio = reference
        .map(|r| format!("{:.0}%", 100.0 * f.per_sec / r))
        .unwrap_or_else(|| "-".into());
    println!(
        "| {name} | {:.0}/s | {:.2} ms | {:.2} ms | {:.2} ms | {} | {ratio} |",
        f.per_sec, f.p50, f.p90, f.p99, f.errors
    );
}

fn main() {
    let args = Args::parse_from(std::env::args().filter(|a| a != "--bench"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(args));
}

async fn run(args: Args) {
    let t = target(&args);
    let mut settings = Settings::for_database(&t.url);
    settings.database.pool_size = 8;
    let db = Db::connect(&settings.database).unwrap();
    db.migrate().unwrap();
    let (la_key, ed_key, _admin_key, flagged) = tokio::task::block_in_place(|| seed(&db, &args));
    let flagged = Arc::new(flagged);
    let misses: Arc<Vec<String>> = Arc::new(
        NhsNumbers::default()
            .skip(args.persons + 1000)
            .take(100_000)
            .collect(),
    );

    println!(
        "\nbackend {}, {} persons/plans, {} past attendances, concurrency {}, {} s per scenario, server log level {}",
        args.backend, args.persons, args.attendances, args.concurrency, args.seconds, args.log_level
    );
    println!("server: {}", server_binary());
    let no_jobs = [
        ("CPIS__JOBS__DELIVER", ""),
        ("CPIS__JOBS__EXPIRE", ""),
        ("CPIS__JOBS__PURGE", ""),
        ("CPIS__JOBS__REMATCH", ""),
    ];
    let server = serve(&t.url, &args.log_level, &no_jobs);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()
        .unwrap();
    let base = server.address.clone();

    println!("\n| scenario | throughput | p50 | p90 | p99 | errors | of /health/live |");
    println!("|---|---|---|---|---|---|---|");
    let mut runs = HttpRuns::start(&client, &base, server.child.id(), &args).await;
    if args.runs("hit") {
        let (b, k, f) = (base.clone(), ed_key.clone(), flagged.clone());
        runs.scenario("flag check, hit", move |c, n| {
            let nhs = &f[(n * 7919) % f.len()];
            c.post(format!("{b}/v1/flag-checks"))
                .bearer_auth(&k)
                .json(&serde_json::json!({"patient": {"nhs_number": nhs}, "setting_type": "ED"}))
        })
        .await;
    }
    if args.runs("miss") {
        let (b, k, m) = (base.clone(), ed_key.clone(), misses.clone());
        runs.scenario("flag check, miss", move |c, n| {
            c.post(format!("{b}/v1/flag-checks"))
                .bearer_auth(&k)
                .json(&serde_json::json!({"patient": {"nhs_number": m[n % m.len()]}}))
        })
        .await;
    }
    let run_id = std::process::id();
    if args.runs("attendance") {
        let (b, k, f) = (base.clone(), ed_key.clone(), flagged.clone());
        runs.scenario("attendance (flagged child)", move |c, n| {
            let nhs = &f[(n * 104_729) % f.len()];
            c.post(format!("{b}/v1/attendances"))
                .bearer_auth(&k)
                .json(&serde_json::json!({
                    "attendance_id": format!("BENCH-{run_id}-{n}"), "setting_ods": ED, "setting_type": "ED",
                    "arrived_at": chrono::Utc::now().to_rfc3339(), "patient": {"nhs_number": nhs}}))
        })
        .await;
    }
    runs.finish();

    if args.runs("import") {
        bulk_import(&args, &db, &client, &base, &la_key).await;
        println!(
            "server resident set after the import: {:.0} MB; its peak since it started: {:.0} MB",
            rss_mb(server.child.id()),
            status_mb(server.child.id(), "VmHWM:")
        );
    }
    drop(server);
    if args.runs("delivery") {
        delivery(
            &args,
            &t,
            &db,
            &client,
            &no_jobs,
            (&la_key, &ed_key),
            &flagged,
            run_id,
        )
        .await;
    }
}

/// Bulk import: a CSV of new plans, against the database's own multi-row insert of the same rows.
async fn bulk_import(args: &Args, db: &Db, client: &reqwest::Client, base: &str, la_key: &str) {
    let mut generator = Generator::new(99, chrono::Utc::now().date_naive());
    let import_people: Vec<Person> = {
        let mut numbers = NhsNumbers::default().skip(args.persons + 200_000);
        generator
            .population(args.import_rows)
            .into_iter()
            .map(|mut p| {
                p.nhs_number = numbers.next().unwrap();
                p
            })
            .collect()
    };
    let mut csv = String::from("local_reference,nhs_number,plan_type,start_date,given_name,family_name,birth_date,sex,postcode\n");
    for (i, p) in import_people.iter().enumerate() {
        csv.push_str(&format!(
            "IMP-{i},{},CPP,2026-01-10,{},{},{},{},{}\n",
            p.nhs_number, p.given_name, p.family_name, p.birth_date, p.sex, p.postcode
        ));
    }
    let started = Instant::now();
    let resp = client
        .post(format!("{base}/v1/plans/bulk"))
        .bearer_auth(la_key)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    let import_secs = started.elapsed().as_secs_f64();
    assert_eq!(
        body["accepted"].as_u64(),
        Some(args.import_rows as u64),
        "import failed: {status} {}",
        body["detail"]
    );
    let now = chrono::Utc::now().naive_utc();
    let raw_rows: Vec<PlanRow> = import_people
        .iter()
        .enumerate()
        .map(|(i, p)| plan_row(p, "X26", format!("RAW-{i}"), now))
        .collect();
    tokio::task::block_in_place(|| settle(db));
    let started = Instant::now();
    tokio::task::block_in_place(|| {
        db.write_blocking(|conn| {
            for chunk in raw_rows.chunks(500) {
                cpis::db::insert_plans(conn, chunk)?;
            }
            Ok::<_, cpis::db::DbError>(())
        })
        .unwrap()
    });
    let raw_secs = started.elapsed().as_secs_f64();
    let (import_rate, raw_rate) = (
        args.import_rows as f64 / import_secs,
        args.import_rows as f64 / raw_secs,
    );
    println!(
        "\nbulk import of {} rows: {:.1} s, {:.0} rows/s; the database's own multi-row insert of the same plans: {:.0} rows/s; ratio {:.0}%",
        args.import_rows,
        import_secs,
        import_rate,
        raw_rate,
        100.0 * import_rate / raw_rate
    );
}

/// Waits until SQLite's WAL is copied into the database. cpis copies an import's pages after its answer (its
/// checkpointer, or the next long write first), so the reference insert, timed next, must not start while that
/// work is pending: it would pay for it, or slow it down beside it.
fn settle(db: &Db) {
    for _ in 0..200 {
        if db.copy_wal().unwrap_or(false) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Delivery: a backlog of notifications to a local webhook receiver and a local SMTP server (STARTTLS), then
/// attendance-to-webhook and attendance-to-email latency with the deliverer running.
#[allow(clippy::too_many_arguments)]
async fn delivery(
    args: &Args,
    t: &Target,
    db: &Db,
    client: &reqwest::Client,
    no_jobs: &[(&str, &str); 4],
    (la_key, ed_key): (&str, &str),
    flagged: &[String],
    run_id: u32,
) {
    let receiver = receiver::start_receiver();
    let smtp_server = smtp::start_smtp(0).await;
    let admin_server = serve(
        &t.url,
        &args.log_level,
        &[
            ("CPIS__WEBHOOK__ALLOW_PRIVATE_TARGETS", "true"),
            ("CPIS__WEBHOOK__ALLOW_HTTP", "true"),
            no_jobs[0],
            no_jobs[1],
            no_jobs[2],
            no_jobs[3],
        ],
    );
    let put: serde_json::Value = client
        .put(format!("{}/v1/organisations/{LA}/delivery", admin_server.address))
        .bearer_auth(la_key)
        .json(&serde_json::json!({"email": ["mash@birmingham.example.org"], "webhook": {"url": receiver.url}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    receiver.trust(put["webhook"]["secret"].as_str().unwrap_or_default());
    // Clear what the HTTP scenarios left so the backlog is exactly what follows.
    {
        use diesel::connection::SimpleConnection;
        let mut conn = db.get().unwrap();
        conn.batch_execute(
            "DELETE FROM delivery_attempts; DELETE FROM deliveries; DELETE FROM notifications;",
        )
        .unwrap();
    }
    let mut sent_at = HashMap::new();
    for i in 0..args.notifications {
        let nhs = &flagged[(i * 31) % (flagged.len() - 1000)];
        let r: serde_json::Value = client
            .post(format!("{}/v1/attendances", admin_server.address))
            .bearer_auth(ed_key)
            .json(&serde_json::json!({"attendance_id": format!("DLV-{run_id}-{i}"), "setting_ods": ED, "setting_type": "ED",
                                      "arrived_at": chrono::Utc::now().to_rfc3339(), "patient": {"nhs_number": nhs}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(id) = r["notifications"][0].as_str() {
            sent_at.insert(id.to_string(), ());
        }
    }
    drop(admin_server);
    let expected = sent_at.len();
    let port = smtp_server.port.to_string();
    let ca = smtp_server.ca_cert.display().to_string();
    let deliver_env = [
        ("CPIS__WEBHOOK__ALLOW_PRIVATE_TARGETS", "true"),
        ("CPIS__WEBHOOK__ALLOW_HTTP", "true"),
        ("CPIS__MAIL__HOST", "localhost"),
        ("CPIS__MAIL__PORT", port.as_str()),
        ("CPIS__MAIL__CA_CERT", ca.as_str()),
        ("CPIS__MAIL__FROM", "cpis <cpis@cpis.test>"),
        ("CPIS__JOBS__DELIVER", "*/1 * * * * *"),
        ("CPIS__JOBS__EXPIRE", ""),
        ("CPIS__JOBS__PURGE", ""),
        ("CPIS__JOBS__REMATCH", ""),
    ];
    let started = Instant::now();
    let deliverer = serve(&t.url, &args.log_level, &deliver_env);
    let mut webhooks_done = None;
    let mut emails_done = None;
    while (webhooks_done.is_none() || emails_done.is_none())
        && started.elapsed() < Duration::from_secs(600)
    {
        if webhooks_done.is_none() && receiver.hooks().len() >= expected {
            webhooks_done = Some(started.elapsed());
        }
        if emails_done.is_none() && smtp_server.mails().len() >= expected {
            emails_done = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let w = webhooks_done.unwrap_or(started.elapsed());
    let e = emails_done.unwrap_or(started.elapsed());
    println!(
        "\ndelivery of a backlog of {expected} notifications (process start included): webhooks {:.0}/s ({} received in {:.1} s), emails {:.0}/s ({} received in {:.1} s)",
        expected as f64 / w.as_secs_f64(),
        receiver.hooks().len(),
        w.as_secs_f64(),
        expected as f64 / e.as_secs_f64(),
        smtp_server.mails().len(),
        e.as_secs_f64()
    );

    // Attendance-to-webhook and attendance-to-email latency with the deliverer running and woken by each write.
    let before = receiver.hooks().len();
    let mails_before = smtp_server.mails().len();
    let mut posted = Vec::new();
    for i in 0..300.min(flagged.len() / 2) {
        // People kept apart from the backlog, so no earlier visit of theirs absorbs the notification.
        let nhs = &flagged[flagged.len() - 1 - i];
        let t0 = Instant::now();
        let r: serde_json::Value = client
            .post(format!("{}/v1/attendances", deliverer.address))
            .bearer_auth(ed_key)
            .json(&serde_json::json!({"attendance_id": format!("LAT-{run_id}-{i}"), "setting_ods": "RXK01", "setting_type": "ED",
                                      "arrived_at": chrono::Utc::now().to_rfc3339(), "patient": {"nhs_number": nhs}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        match r["notifications"][0].as_str() {
            Some(id) => posted.push((id.to_string(), t0)),
            None if i == 0 => eprintln!("latency attendance answered without a notification: {r}"),
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let wait = Instant::now();
    while (receiver.hooks().len() < before + posted.len()
        || smtp_server.mails().len() < mails_before + posted.len())
        && wait.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let arrivals = receiver.arrivals();
    let mails: Vec<(String, Instant)> = smtp_server
        .mails()
        .iter()
        .filter_map(|m| Some((m.notification_id()?, m.received)))
        .collect();
    for (what, arrived) in [("webhook", &arrivals), ("email", &mails)] {
        let mut latencies: Vec<Duration> = posted
            .iter()
            .filter_map(|(id, t0)| {
                arrived
                    .iter()
                    .find(|(n, _)| n == id)
                    .map(|(_, at)| at.saturating_duration_since(*t0))
            })
            .collect();
        latencies.sort();
        println!(
            "attendance-to-{what} latency over {} of {} attendances (about 100/s): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms",
            latencies.len(),
            posted.len(),
            pct(&latencies, 0.5),
            pct(&latencies, 0.9),
            pct(&latencies, 0.99)
        );
    }
    drop(deliverer);
}
