use crate::helpers::*;
use serde_json::json;

#[tokio::test]
async fn an_admin_creates_and_updates_organisations_and_anyone_reads_them() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let created = app
            .add_org("e08000025", "Birmingham CC", "local_authority")
            .await;
        assert_eq!(created.status, 201);
        assert_eq!(created.body["ods_code"], "E08000025");
        let updated = app
            .add_org("E08000025", "Birmingham City Council", "local_authority")
            .await;
        assert_eq!(updated.status, 200);
        let reader = app.key("E08000025", &["social_care"]).await;
        let read = app.get("/v1/organisations/e08000025", &reader).await;
        assert_eq!(read.body["name"], "Birmingham City Council");
        assert_eq!(read.body["emergency_duty_phone"], "0121 675 4806");
        app.get("/v1/organisations/NOPE9", &reader)
            .await
            .problem(404);
        let bad = app
            .post(
                "/v1/organisations",
                &app.admin_key,
                json!({"ods_code": "E-1", "name": "", "kind": "council", "email": "x"}),
            )
            .await;
        bad.problem(422);
        let mut fields = bad.error_fields();
        fields.sort();
        assert_eq!(fields, ["email", "kind", "name", "ods_code"]);
    }
}
