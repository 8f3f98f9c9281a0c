//! Liveness and readiness, without authentication, for load balancers and orchestrators.

#[allow(unused_imports)]
use crate::api::openapi::ProblemDoc;
use crate::error::ApiError;
use crate::startup::AppState;
use actix_web::{web, HttpResponse};
use serde_json::json;

#[utoipa::path(get, path = "/health/live", tag = "operations", responses((status = 200, description = "The process is up")))]
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/health/ready", tag = "operations", responses((status = 200, description = "Database reachable and migrations current"), (status = 503, description = "Not ready", body = ProblemDoc)))]
/// Ready when the database answers and every embedded migration has been applied.
pub async fn ready(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let db = state.db.clone();
    let ready = tokio::task::spawn_blocking(move || db.is_ready().unwrap_or(false))
        .await
        .map_err(ApiError::internal)?;
    if ready {
        Ok(
            HttpResponse::Ok()
                .json(json!({"status": "ready", "database": state.db.backend_name()})),
        )
    } else {
        Err(ApiError::Unavailable(
            "the database is unreachable or its migrations are not current".into(),
        ))
    }
}

#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
/// Prometheus text exposition; notifications by state are counted at scrape time.
pub async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    use crate::db::schema::notifications;
    use diesel::prelude::*;
    let counts = state
        .db
        .run(|conn| {
            notifications::table
                .group_by(notifications::status)
                .select((notifications::status, diesel::dsl::count_star()))
                .load::<(String, i64)>(conn)
                .map_err(ApiError::from)
        })
        .await?;
    for s in [
        crate::notify::PENDING,
        crate::notify::DELIVERED,
        crate::notify::DEAD,
    ] {
        let n = counts
            .iter()
            .find(|(k, _)| k == s)
            .map(|(_, n)| *n)
            .unwrap_or(0);
        state.metrics.notifications.with_label_values(&[s]).set(n);
    }
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render()))
}
