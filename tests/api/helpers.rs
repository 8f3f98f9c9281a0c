//! `spawn_app()` and friends: a throwaway database per test, the server on port 0, and a client that speaks to it.

use cpis::audit::Actor;
use cpis::auth::Role;
use cpis::config::Settings;
use cpis::db::Db;
use cpis::domain::OdsCode;
use cpis::startup::Application;
use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::io::BufRead;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub const POSTGRES_ENV: &str = "CPIS_TEST_POSTGRES_URL";

/// SQLite always; PostgreSQL too when `CPIS_TEST_POSTGRES_URL` is set.
pub fn backends() -> Vec<Backend> {
    let mut v = vec![Backend::Sqlite];
    if std::env::var(POSTGRES_ENV).is_ok_and(|u| !u.is_empty()) {
        v.push(Backend::Postgres);
    }
    v
}

/// A database that exists for one test: a SQLite file in a temporary folder, or a PostgreSQL database made
/// on the server named by `CPIS_TEST_POSTGRES_URL` and dropped afterwards.
pub struct TestDb {
    pub url: String,
    pg: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

fn with_database(base: &str, name: &str) -> String {
    let (without_query, query) = match base.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (base, None),
    };
    let prefix = match without_query.rfind('/') {
        Some(i) if i > "postgres://".len() => &without_query[..i],
        _ => without_query,
    };
    match query {
        Some(q) => format!("{prefix}/{name}?{q}"),
        None => format!("{prefix}/{name}"),
    }
}

/// A connection to the server's own database, to make and drop test databases.
fn admin_connection(base: &str) -> diesel::ConnectionResult<PgConnection> {
    // As cpis does before its first connection: OpenSSL without its exit-time clean-up (see `process_exit`).
    cpis::db::prepare_libpq();
    PgConnection::establish(base)
}

impl TestDb {
    pub fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("cpis.db").display());
                TestDb {
                    url,
                    pg: None,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let base = std::env::var(POSTGRES_ENV).expect("CPIS_TEST_POSTGRES_URL");
                let name = format!("cpis_test_{}", uuid::Uuid::new_v4().simple());
                let mut admin = admin_connection(&base).expect("connect to CPIS_TEST_POSTGRES_URL");
                admin
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .expect("create test database");
                TestDb {
                    url: with_database(&base, &name),
                    pg: Some((base, name)),
                    _dir: None,
                }
            }
        }
    }

    pub fn settings(&self) -> Settings {
        let mut s = Settings::for_database(&self.url);
        s.server.port = 0;
        s.server.workers = 1;
        s.database.pool_size = 8;
        // Jobs run only where a test turns them on, so each test controls when delivery happens.
        s.jobs.deliver = String::new();
        s.jobs.expire = String::new();
        s.jobs.purge = String::new();
        s.jobs.rematch = String::new();
        s
    }

    /// Ends every PostgreSQL session on this test's database, as a restart of the server would; answers how many.
    pub fn terminate_sessions(&self) -> usize {
        #[derive(diesel::QueryableByName)]
        struct Ended {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        use diesel::RunQueryDsl;
        let (base, name) = self.pg.as_ref().expect("a PostgreSQL test database");
        let mut admin = admin_connection(base).expect("connect to CPIS_TEST_POSTGRES_URL");
        let ended: Ended = diesel::sql_query(format!(
            "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity WHERE datname = '{name}'"
        ))
        .get_result(&mut admin)
        .expect("terminate sessions");
        ended.n as usize
    }

    pub fn db(&self) -> Db {
        let db = Db::connect(&self.settings().database).expect("open test database");
        db.migrate().expect("migrate test database");
        db
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((base, name)) = &self.pg {
            if let Ok(mut admin) = admin_connection(base) {
                let _ =
                    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        }
    }
}

pub struct TestApp {
    pub address: String,
    pub db: TestDb,
    pub client: reqwest::Client,
    pub admin_key: String,
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl std::fmt::Debug for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.body)
    }
}

impl Resp {
    pub fn content_type(&self) -> String {
        self.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }

    /// Asserts an RFC 9457 problem body with this status, and answers it.
    pub fn problem(&self, status: u16) -> &Value {
        assert_eq!(self.status.as_u16(), status, "{self:?}");
        assert_eq!(self.content_type(), "application/problem+json", "{self:?}");
        assert_eq!(self.body["status"], status, "{self:?}");
        assert!(
            self.body["type"].as_str().is_some_and(|t| !t.is_empty()),
            "{self:?}"
        );
        assert!(
            self.body["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{self:?}"
        );
        assert!(
            self.body["detail"].as_str().is_some_and(|t| !t.is_empty()),
            "{self:?}"
        );
        &self.body
    }

    /// The fields named in a validation problem.
    pub fn error_fields(&self) -> Vec<String> {
        self.body["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| e["field"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Starts the server on a fresh database with one admin organisation and key.
pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, |_| {}).await
}

/// `spawn_app` with settings changed first.
pub async fn spawn_app_with(backend: Backend, change: impl FnOnce(&mut Settings)) -> TestApp {
    let db = TestDb::new(backend);
    let mut settings = db.settings();
    change(&mut settings);
    let app = Application::build(settings).expect("build application");
    let address = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped());
    let admin_key = bootstrap_admin(&db);
    TestApp {
        address,
        db,
        client: reqwest::Client::new(),
        admin_key,
    }
}

/// What an operator does first with the CLI: an organisation for the admins and an admin key.
fn bootstrap_admin(db: &TestDb) -> String {
    let handle = db.db();
    let org = cpis::api::parse_organisation(
        json!({"ods_code": "X26", "name": "cpis operators", "kind": "other"}),
    )
    .unwrap();
    let now = chrono::Utc::now().naive_utc();
    handle
        .write_blocking(|conn| {
            cpis::api::store_organisation(conn, now, &Actor::cli(), org)?;
            cpis::api::create_key(
                conn,
                now,
                &Actor::cli(),
                &OdsCode::parse("X26").unwrap(),
                &[Role::Admin],
            )
        })
        .expect("bootstrap admin key")
        .1
}

impl TestApp {
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let mut req = self
            .client
            .request(method, format!("{}{}", self.address, path));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await.expect("request sent");
        Self::read(res).await
    }

    pub async fn read(res: reqwest::Response) -> Resp {
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> Resp {
        self.request(Method::POST, path, Some(key), Some(body))
            .await
    }

    pub async fn get(&self, path: &str, key: &str) -> Resp {
        self.request(Method::GET, path, Some(key), None).await
    }

    pub async fn put(&self, path: &str, key: &str, body: Value) -> Resp {
        self.request(Method::PUT, path, Some(key), Some(body)).await
    }

    pub async fn patch(&self, path: &str, key: &str, body: Value) -> Resp {
        self.request(Method::PATCH, path, Some(key), Some(body))
            .await
    }

    /// Sends raw bytes with a chosen content type.
    pub async fn post_raw(&self, path: &str, key: &str, content_type: &str, body: Vec<u8>) -> Resp {
        let res = self
            .client
            .post(format!("{}{}", self.address, path))
            .bearer_auth(key)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request sent");
        Self::read(res).await
    }

    pub async fn add_org(&self, ods: &str, name: &str, kind: &str) -> Resp {
        self.add_org_in(ods, name, kind, "BSOL").await
    }

    pub async fn add_org_in(&self, ods: &str, name: &str, kind: &str, region: &str) -> Resp {
        let resp = self
            .post(
                "/v1/organisations",
                &self.admin_key,
                json!({
                    "ods_code": ods, "name": name, "kind": kind, "region": region,
                    "office_phone": "0121 303 1888", "emergency_duty_phone": "0121 675 4806",
                    "email": format!("safeguarding@{}.example.org", ods.to_lowercase()),
                }),
            )
            .await;
        assert!(resp.status.is_success(), "{resp:?}");
        resp
    }

    /// Attendances stored, read straight from the database.
    pub fn stored_attendances(&self) -> i64 {
        use diesel::prelude::*;
        let db = self.db.db();
        let mut conn = db.get().unwrap();
        cpis::db::schema::attendances::table
            .count()
            .get_result(&mut *conn)
            .unwrap()
    }

    pub async fn key(&self, org: &str, roles: &[&str]) -> String {
        let resp = self
            .post(
                "/v1/keys",
                &self.admin_key,
                json!({"org": org, "roles": roles}),
            )
            .await;
        assert_eq!(resp.status, StatusCode::CREATED, "{resp:?}");
        resp.body["key"]
            .as_str()
            .expect("key in answer")
            .to_string()
    }

    /// The outcomes of a child's `action` events in the audit trail, newest first, as an auditor of a new
    /// information governance organisation (AUD01) reads them.
    pub async fn audit_outcomes(&self, nhs_number: &str, action: &str) -> Vec<String> {
        self.add_org("AUD01", "Information Governance", "other")
            .await;
        let auditor = self.key("AUD01", &["auditor"]).await;
        let trail = self
            .post(
                "/v1/audit/search",
                &auditor,
                json!({"nhs_number": nhs_number}),
            )
            .await;
        assert_eq!(trail.status, StatusCode::OK, "{trail:?}");
        trail.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == action)
            .map(|e| e["outcome"].as_str().unwrap().to_string())
            .collect()
    }

    /// Two local authorities, a care setting, an auditor: the cast of most tests.
    pub async fn world(&self) -> World {
        self.add_org("E08000025", "Birmingham City Council", "local_authority")
            .await;
        self.add_org("E08000026", "Coventry City Council", "local_authority")
            .await;
        self.add_org(
            "RXK01",
            "Sandwell General Emergency Department",
            "care_setting",
        )
        .await;
        self.add_org("AUD01", "Information Governance", "other")
            .await;
        World {
            la: self.key("E08000025", &["social_care"]).await,
            other_la: self.key("E08000026", &["social_care"]).await,
            care: self.key("RXK01", &["care_setting"]).await,
            auditor: self.key("AUD01", &["auditor"]).await,
        }
    }
}

pub struct World {
    pub la: String,
    pub other_la: String,
    pub care: String,
    pub auditor: String,
}

/// The valid NHS numbers of the test range (999 000 0000 to 999 999 9999) in order, with their real check digits:
/// the synthetic data's own sequence.
pub fn test_nhs_numbers() -> impl Iterator<Item = String> {
    cpis::mpi::synthetic::NhsNumbers::default()
}

/// The `n`th of [`test_nhs_numbers`].
pub fn test_nhs_number(n: u32) -> String {
    test_nhs_numbers()
        .nth(n as usize)
        .expect("the test range has enough numbers")
}

pub fn cpp_plan(reference: &str, nhs: &str) -> Value {
    json!({
        "local_reference": reference,
        "nhs_number": nhs,
        "plan_type": "CPP",
        "start_date": "2026-01-10",
        "child": {"given_name": "Amelia", "family_name": "Smith", "birth_date": "2019-03-04", "sex": "female", "postcode": "B1 1AA"}
    })
}

pub struct Served {
    pub child: std::process::Child,
    pub address: String,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

/// Runs the real `cpis serve` binary on a test database with JSON logs (and `env` on top), and waits for it to
/// say where it listens.
pub fn serve(db: &TestDb, env: &[(&str, &str)]) -> Served {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cpis"))
        .arg("serve")
        .env("CPIS_CONFIG_DIR", "/nonexistent")
        .env("CPIS__DATABASE__URL", &db.url)
        .env("CPIS__SERVER__PORT", "0")
        .env("CPIS__LOG__FORMAT", "json")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start cpis serve");
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut port = None;
    let mut line = String::new();
    while port.is_none() {
        line.clear();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("cpis serve exited early: {}", log.lock().unwrap());
        }
        log.lock().unwrap().push_str(&line);
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("listening on"))
            {
                port = v["port"].as_u64();
            }
        }
    }
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        while stderr.read_line(&mut line).is_ok_and(|n| n > 0) {
            sink.lock().unwrap().push_str(&line);
            line.clear();
        }
    });
    Served {
        child,
        address: format!("http://127.0.0.1:{}", port.unwrap()),
        log,
    }
}
