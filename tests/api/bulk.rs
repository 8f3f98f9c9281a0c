//! Bulk plan files: each row gets its CP-IS code, the file gets its code, a resent file changes nothing, and a
//! corrupt file changes nothing at all.

use crate::helpers::*;
use serde_json::Value;

const HEADER: &str = "local_reference,nhs_number,plan_type,start_date,end_date,expected_delivery_date,given_name,family_name,birth_date,sex,postcode";

fn file(rows: &[String]) -> Vec<u8> {
    let mut f = String::from(HEADER);
    f.push('\n');
    for r in rows {
        f.push_str(r);
        f.push('\n');
    }
    f.into_bytes()
}

fn mixed() -> Vec<u8> {
    file(&[
        format!(
            "GOOD-1,{},CPP,2026-01-10,,,Amelia,Smith,2019-03-04,female,B1 1AA",
            test_nhs_number(31)
        ),
        "BAD-NHS,9434765918,CPP,2026-01-10,,,,,,,".to_string(),
        format!("UCPP-NO-EDD,{},UCPP,2026-02-01,,,,,,,", test_nhs_number(32)),
        format!(
            "END-BEFORE-START,{},LAC,2026-03-01,2026-02-01,,,,,,",
            test_nhs_number(33)
        ),
        format!("BAD-TYPE,{},CP,2026-03-01,,,,,,,", test_nhs_number(34)),
        format!("GOOD-1,{},LAC,2026-03-01,,,,,,,", test_nhs_number(35)),
        format!(
            "GOOD-2,{},UCPP,2026-04-01,,2026-12-31,,,,,",
            test_nhs_number(36)
        ),
    ])
}

fn codes(body: &Value) -> Vec<(String, String)> {
    body["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["local_reference"].as_str().unwrap_or("-").to_string(),
                r["code"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn reasons(body: &Value, row: usize) -> String {
    body["rows"][row - 1]["reasons"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| r.as_str().unwrap())
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_file_mixing_good_and_bad_rows_gets_exactly_the_right_codes() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        let resp = app
            .post_raw("/v1/plans/bulk", &w.la, "text/csv", mixed())
            .await;
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.body["file_code"], "CPF03");
        assert_eq!(
            (
                resp.body["accepted"].as_u64(),
                resp.body["rejected"].as_u64()
            ),
            (Some(2), Some(5))
        );
        let expected: Vec<(String, String)> = [
            ("GOOD-1", "CPR06"),
            ("BAD-NHS", "CPR07"),
            ("UCPP-NO-EDD", "CPR07"),
            ("END-BEFORE-START", "CPR07"),
            ("BAD-TYPE", "CPR07"),
            ("GOOD-1", "CPR07"),
            ("GOOD-2", "CPR06"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(codes(&resp.body), expected);
        assert!(
            reasons(&resp.body, 2).starts_with("nhs_number:"),
            "{}",
            reasons(&resp.body, 2)
        );
        assert!(reasons(&resp.body, 3).starts_with("expected_delivery_date:"));
        assert!(reasons(&resp.body, 4).starts_with("end_date:"));
        assert!(reasons(&resp.body, 5).starts_with("plan_type:"));
        assert!(
            reasons(&resp.body, 6).contains("row 1"),
            "{}",
            reasons(&resp.body, 6)
        );
        let stored = app
            .post("/v1/plans/search", &w.la, serde_json::json!({}))
            .await;
        assert_eq!(stored.body["total"], 2);
        // The registered child can be checked at once.
        let check = app
            .post(
                "/v1/flag-checks",
                &w.care,
                serde_json::json!({"patient": {"nhs_number": test_nhs_number(31)}}),
            )
            .await;
        assert_eq!(check.body["flags"][0]["plan_type"], "CPP");
    }
}

#[tokio::test]
async fn resending_the_same_file_changes_nothing() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        let first = app
            .post_raw("/v1/plans/bulk", &w.la, "text/csv", mixed())
            .await;
        let before = app
            .post("/v1/plans/search", &w.la, serde_json::json!({}))
            .await;
        let again = app
            .post_raw("/v1/plans/bulk", &w.la, "text/csv; charset=utf-8", mixed())
            .await;
        assert_eq!(codes(&again.body), codes(&first.body));
        let outcomes: Vec<&str> = again.body["rows"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["outcome"].as_str())
            .collect();
        assert_eq!(outcomes, ["unchanged", "unchanged"]);
        let after = app
            .post("/v1/plans/search", &w.la, serde_json::json!({}))
            .await;
        assert_eq!(
            after.body["items"], before.body["items"],
            "same plans, same versions, same timestamps"
        );
    }
}

#[tokio::test]
async fn a_corrupt_file_gets_cpf01_and_changes_nothing() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        let mut latin1 = file(&[format!(
            "OK-FIRST,{},CPP,2026-01-10,,,,,,,",
            test_nhs_number(41)
        )]);
        latin1.extend_from_slice(b"BAD-ENC,9434765919,CPP,2026-01-10,,,Ren\xe9e,M\xfcller,,,\n");
        // The same after more good rows than are registered at a time, so some were already stored when the
        // bad row is read.
        let good: Vec<String> = test_nhs_numbers()
            .skip(1_000)
            .take(2_500)
            .enumerate()
            .map(|(i, nhs)| format!("LATE-{i},{nhs},CPP,2026-01-10,,,,,,,"))
            .collect();
        let mut late = file(&good);
        late.extend_from_slice(b"LATE-BAD,9434765919,CPP,2026-01-10,,,Ren\xe9e,,,,\n");
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("not CSV", b"{\"plans\": [1, 2, 3]}".to_vec()),
            (
                "binary",
                vec![0x89, b'P', b'N', b'G', 0, 0, 0xff, 0xfe, b'\n', 1, 2, 3],
            ),
            (
                "wrong header",
                b"ref,nhs,type,start\nA,9434765919,CPP,2026-01-10\n".to_vec(),
            ),
            (
                "missing column",
                b"local_reference,nhs_number,plan_type\nA,9434765919,CPP\n".to_vec(),
            ),
            ("wrong encoding after a good row", latin1),
            ("wrong encoding after 2,500 good rows", late),
            ("header only", format!("{HEADER}\n").into_bytes()),
            ("empty", Vec::new()),
        ];
        for (what, body) in cases {
            let resp = app
                .post_raw("/v1/plans/bulk", &w.la, "text/csv", body)
                .await;
            resp.problem(422);
            assert_eq!(resp.body["file_code"], "CPF01", "{what}: {resp:?}");
            if what.contains("2,500") {
                assert_eq!(resp.body["detail"], "row 2501 is not UTF-8", "{resp:?}");
            }
        }
        assert_eq!(
            app.post("/v1/plans/search", &w.la, serde_json::json!({}))
                .await
                .body["total"],
            0,
            "nothing changed"
        );
        let verify = app.get("/v1/audit/verify", &w.auditor).await;
        assert_eq!(verify.body["ok"], true);
    }
}

#[tokio::test]
async fn all_good_is_cpf02_all_bad_is_cpf04_and_only_social_care_sends_csv() {
    let app = spawn_app(Backend::Sqlite).await;
    let w = app.world().await;
    let good = file(&[
        format!("G-1,{},CPP,2026-01-10,,,,,,,", test_nhs_number(51)),
        format!("G-2,{},LAC,2026-01-10,,,,,,,", test_nhs_number(52)),
    ]);
    assert_eq!(
        app.post_raw("/v1/plans/bulk", &w.la, "text/csv", good.clone())
            .await
            .body["file_code"],
        "CPF02"
    );
    let bad = file(&["B-1,123,CPP,2026-01-10,,,,,,,".to_string()]);
    assert_eq!(
        app.post_raw("/v1/plans/bulk", &w.la, "text/csv", bad)
            .await
            .body["file_code"],
        "CPF04"
    );
    app.post_raw("/v1/plans/bulk", &w.la, "application/json", good.clone())
        .await
        .problem(415);
    app.post_raw("/v1/plans/bulk", &w.care, "text/csv", good)
        .await
        .problem(403);
}

#[tokio::test]
async fn the_cli_imports_the_same_format() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plans.csv");
        std::fs::write(&path, mixed()).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cpis"))
            .args([
                "plans",
                "import",
                path.to_str().unwrap(),
                "--org",
                "E08000025",
            ])
            .env("CPIS_CONFIG_DIR", "/nonexistent")
            .env("CPIS__DATABASE__URL", &app.db.url)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("CPF03: 2 accepted, 5 rejected"), "{stdout}");
        assert!(
            stdout.contains("row 2 (BAD-NHS): CPR07 nhs_number"),
            "{stdout}"
        );
        assert_eq!(
            app.post("/v1/plans/search", &w.la, serde_json::json!({}))
                .await
                .body["total"],
            2
        );
    }
}

#[tokio::test]
async fn a_child_on_two_rows_of_a_file_is_one_person_with_both_plans() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        let nhs = test_nhs_number(37);
        let twice = file(&[
            format!("TWO-1,{nhs},CPP,2026-01-10,,,Amelia,Jones,2019-05-06,female,B1 1AA"),
            format!("TWO-2,{nhs},LAC,2026-02-01,,,Amelia,Jones,2019-05-06,female,B2 2BB"),
        ]);
        let resp = app
            .post_raw("/v1/plans/bulk", &w.la, "text/csv", twice)
            .await;
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.body["file_code"], "CPF02", "{}", resp.body);
        let check = app
            .post(
                "/v1/flag-checks",
                &w.care,
                serde_json::json!({"patient": {"nhs_number": nhs}}),
            )
            .await;
        assert_eq!(check.body["match"]["status"], "matched", "{}", check.body);
        let mut types: Vec<&str> = check.body["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["plan_type"].as_str().unwrap())
            .collect();
        types.sort();
        assert_eq!(types, ["CPP", "LAC"]);
    }
}

/// A bulk file's chunk, or a group commit's batch, goes in as multi-row inserts of a few fixed sizes. Every row
/// is stored as given whatever the count, and on PostgreSQL each size is one statement the server prepares once
/// per connection: a statement with a new number of rows would be parsed and planned again on every batch, which
/// was half the time PostgreSQL spent on an import's inserts.
#[test]
fn rows_inserted_together_are_all_stored_and_postgresql_prepares_each_size_once() {
    use cpis::db::models::AccessRow;
    use cpis::db::schema::accesses;
    use cpis::db::DbConnection;
    use diesel::prelude::*;

    /// An access as read back: id, NHS number, setting type, practitioner's name, key.
    type Stored = (
        String,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
    );

    #[derive(QueryableByName)]
    struct Prepared {
        #[diesel(sql_type = diesel::sql_types::Text)]
        statement: String,
    }

    let at = chrono::NaiveDate::from_ymd_opt(2026, 1, 1)
        .unwrap()
        .and_hms_opt(9, 30, 0)
        .unwrap();
    for backend in backends() {
        let test_db = TestDb::new(backend);
        let db = test_db.db();
        db.write_blocking(|conn| {
            let mut prepared_after_first_pass = None;
            for pass in ["a", "b"] {
                // Each chunk size (64 down to 1) alone, around it, and several together, up to a bulk chunk.
                for count in [1usize, 2, 3, 7, 8, 9, 31, 32, 33, 63, 64, 65, 127, 1000] {
                    let rows: Vec<AccessRow> = (0..count)
                        .map(|i| AccessRow {
                            id: format!("{pass}-{count:04}-{i:04}"),
                            nhs_number: test_nhs_number(i as u32 % 50),
                            at: at.into(),
                            setting_ods: "RX1".into(),
                            setting_type: (i % 3 == 0).then(|| "ED".to_string()),
                            kind: "check".into(),
                            access: "unscheduled".into(),
                            practitioner_name: (i % 2 == 0).then(|| format!("Dr Ó'Brien {i}")),
                            practitioner_role: None,
                            key_id: Some(format!("key-{i}")),
                        })
                        .collect();
                    assert_eq!(
                        cpis::db::insert_accesses(conn, &rows)?,
                        count,
                        "{backend:?}"
                    );
                    let stored: Vec<Stored> = cpis::on_backend!(&mut *conn, |c| accesses::table
                        .filter(accesses::id.like(format!("{pass}-{count:04}-%")))
                        .select((
                            accesses::id,
                            accesses::nhs_number,
                            accesses::setting_type,
                            accesses::practitioner_name,
                            accesses::key_id,
                        ))
                        .order(accesses::id)
                        .load(c))?;
                    let expected: Vec<_> = rows
                        .iter()
                        .map(|r| {
                            (
                                r.id.clone(),
                                r.nhs_number.clone(),
                                r.setting_type.clone(),
                                r.practitioner_name.clone(),
                                r.key_id.clone(),
                            )
                        })
                        .collect();
                    assert_eq!(stored, expected, "{backend:?}, {count} rows");
                }
                if let DbConnection::Postgres(c) = &mut *conn {
                    let prepared: Vec<String> = diesel::sql_query(
                        "SELECT statement FROM pg_prepared_statements \
                         WHERE statement LIKE 'INSERT INTO \"accesses\"%'",
                    )
                    .load::<Prepared>(c)?
                    .into_iter()
                    .map(|p| p.statement)
                    .collect();
                    // 64, 32, ..., 1: seven sizes, each prepared once, and no more on the second pass.
                    assert_eq!(prepared.len(), 7, "{prepared:?}");
                    match &prepared_after_first_pass {
                        None => prepared_after_first_pass = Some(prepared),
                        Some(first) => assert_eq!(&prepared, first),
                    }
                }
            }
            Ok::<_, cpis::db::DbError>(())
        })
        .unwrap();
    }
}
