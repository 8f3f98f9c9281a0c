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
