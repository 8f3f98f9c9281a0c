use crate::helpers::*;

#[tokio::test]
async fn health_endpoints_answer_without_a_key_and_report_the_database() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let live = app
            .client
            .get(format!("{}/health/live", app.address))
            .send()
            .await
            .unwrap();
        assert_eq!(live.status(), 200);
        let ready = TestApp::read(
            app.client
                .get(format!("{}/health/ready", app.address))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(ready.status, 200, "{ready:?}");
        let expected = if backend == Backend::Sqlite {
            "sqlite"
        } else {
            "postgresql"
        };
        assert_eq!(ready.body["database"], expected);
    }
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_a_callers_own_id_is_kept() {
    let app = spawn_app(Backend::Sqlite).await;
    let res = app
        .client
        .get(format!("{}/health/live", app.address))
        .header("x-request-id", "trace-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "trace-abc-123");
    let res = app
        .client
        .get(format!("{}/health/live", app.address))
        .header("x-request-id", "no spaces allowed")
        .send()
        .await
        .unwrap();
    let id = res.headers()["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
}

#[tokio::test]
async fn a_refused_request_carries_a_request_id_and_is_counted() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let refused =
            r#"cpis_http_requests_total{method="POST",route="/v1/flag-checks",status="401"}"#;
        let before = scrape(&app).await;
        let body = serde_json::json!({"patient": {"nhs_number": "9434765919"}});
        // No key at all, then a key no one was given: both refused before any handler runs.
        let unsigned = app
            .client
            .post(format!("{}/v1/flag-checks", app.address))
            .header("x-request-id", "refused-1")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(unsigned.status(), 401);
        assert_eq!(unsigned.headers()["x-request-id"], "refused-1");
        let problem: serde_json::Value = unsigned.json().await.unwrap();
        assert_eq!(problem["status"], 401, "{problem}");
        let unknown = app.post("/v1/flag-checks", "cpis_not-a-key", body).await;
        assert_eq!(unknown.status, 401, "{unknown:?}");
        let id = unknown.headers["x-request-id"].to_str().unwrap();
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
        let after = scrape(&app).await;
        assert_eq!(
            sample(&after, refused) - sample(&before, refused),
            2.0,
            "{after}"
        );
    }
}

/// The server's metrics, as Prometheus would scrape them.
async fn scrape(app: &TestApp) -> String {
    app.client
        .get(format!("{}/metrics", app.address))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_change_as_requests_are_made() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        app.post("/v1/plans", &w.la, cpp_plan("M-1", "9434765919"))
            .await;
        let before = scrape(&app).await;
        app.post(
            "/v1/flag-checks",
            &w.care,
            serde_json::json!({"patient": {"nhs_number": "9434765919"}}),
        )
        .await;
        app.post(
            "/v1/flag-checks",
            &w.care,
            serde_json::json!({"patient": {"nhs_number": "9990000018"}}),
        )
        .await;
        let after = scrape(&app).await;
        let hits = r#"cpis_flag_checks_total{access="unscheduled",outcome="hit"}"#;
        let misses = r#"cpis_flag_checks_total{access="unscheduled",outcome="miss"}"#;
        assert_eq!(sample(&after, hits) - sample(&before, hits), 1.0, "{after}");
        assert_eq!(sample(&after, misses) - sample(&before, misses), 1.0);
        let route =
            r#"cpis_http_requests_total{method="POST",route="/v1/flag-checks",status="200"}"#;
        assert_eq!(sample(&after, route) - sample(&before, route), 2.0);
        assert!(
            after.contains(r#"cpis_http_request_duration_seconds_bucket{route="/v1/flag-checks""#)
        );
        assert!(after.contains(r#"cpis_mpi_matches_total{method="nhs_number",status="matched"}"#));
        assert!(
            after.contains(r#"cpis_notifications{state="pending"} 1"#),
            "the hit wrote one notification: {after}"
        );
        // Both checks were audited writes through the group-commit writer.
        let writes =
            sample(&after, "cpis_db_writes_total") - sample(&before, "cpis_db_writes_total");
        let batches = sample(&after, "cpis_db_write_batches_total")
            - sample(&before, "cpis_db_write_batches_total");
        assert!(writes >= 2.0, "{after}");
        assert!(
            (1.0..=writes).contains(&batches),
            "{batches} commits for {writes} writes"
        );
        // On SQLite their answers waited for syncs of the WAL made beside the writer; PostgreSQL's commits are
        // durable by themselves.
        let syncs =
            sample(&after, "cpis_db_wal_syncs_total") - sample(&before, "cpis_db_wal_syncs_total");
        match backend {
            Backend::Sqlite => assert!(syncs >= 1.0, "{after}"),
            Backend::Postgres => assert_eq!(syncs, 0.0, "{after}"),
        }
        assert!(!after.contains("9434765919"));
    }
}

/// PostgreSQL restarted (every session of cpis's ended): checks are answered again without a restart of cpis.
/// The first query on a dead connection fails, and that one request is answered 503, never 500; it tells the
/// other connections, which are asked `SELECT 1` before their next use and replaced. Connections idle for a
/// second are asked anyway, so after a quiet second nothing fails at all.
#[tokio::test]
async fn when_postgresql_ends_every_session_at_most_one_check_is_refused_with_503_and_the_next_succeeds(
) {
    for backend in backends().into_iter().filter(|b| *b == Backend::Postgres) {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        app.post("/v1/plans", &w.la, cpp_plan("BCC-1", "9434765919"))
            .await;
        let check = serde_json::json!({"patient": {"nhs_number": "9434765919"}});
        let hit = app.post("/v1/flag-checks", &w.care, check.clone()).await;
        assert_eq!(hit.status, 200, "{hit:?}");

        // At once: the pool's and the writer's connections were all in use moments ago.
        assert!(app.db.terminate_sessions() >= 2);
        // (Answered at once too if the machine stalled for a second here, since idle connections are asked.)
        let first = app.post("/v1/flag-checks", &w.care, check.clone()).await;
        if first.status != 200 {
            assert_eq!(first.problem(503)["type"], "/problems/unavailable");
        }
        let again = app.post("/v1/flag-checks", &w.care, check.clone()).await;
        assert_eq!(again.status, 200, "{again:?}");
        assert_eq!(again.body["flags"][0]["status"], "active");

        // After a second's rest every connection is asked first, and the first check succeeds.
        assert!(app.db.terminate_sessions() >= 2);
        tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
        let res = app.post("/v1/flag-checks", &w.care, check.clone()).await;
        assert_eq!(res.status, 200, "{res:?}");
        assert_eq!(res.body["flags"][0]["status"], "active");
        let ready = app.get("/health/ready", &app.admin_key).await;
        assert_eq!(ready.status, 200, "{ready:?}");
    }
}

/// The server's memory comes in 4 KiB pages once it has started: with transparent huge pages, each fault in
/// memory the allocator had given back took a whole 2 MiB page, zeroed, and the resident set held what was
/// never used (BENCHMARKS.md, change 53). The allocator's first pages are taken before `main` runs, so the
/// check is that serving takes no huge page beyond those.
#[tokio::test]
async fn the_server_takes_no_transparent_huge_pages_while_it_serves() {
    let db = TestDb::new(Backend::Sqlite);
    let mut served = serve(&db, &[]);
    let pid = served.child.id();
    let read = |file: &str, name: &str| {
        let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    let before = read("smaps_rollup", "AnonHugePages:");
    let client = reqwest::Client::new();
    for _ in 0..200 {
        let ready = client
            .get(format!("{}/health/ready", served.address))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 200);
    }
    let (enabled, after) = (
        read("status", "THP_enabled:"),
        read("smaps_rollup", "AnonHugePages:"),
    );
    served.child.kill().unwrap();
    served.child.wait().unwrap();
    assert_eq!(enabled, "0");
    assert_eq!(after, before, "huge pages taken while serving");
}
