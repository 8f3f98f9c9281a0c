//! Liveness and readiness, without authentication, for load balancers and orchestrators.

use crate::error::ApiError;
use crate::startup::AppState;
use actix_web::{web, HttpResponse};
use serde_json::json;

pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

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
