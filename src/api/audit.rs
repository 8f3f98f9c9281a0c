//! Audit trail endpoints for information governance: search by child or actor and time, and verify the chain.
//! Reading the trail is itself audited.

use super::{page_number, ApiJson};
use crate::audit::{self, Event, SearchFilter};
use crate::auth::{Principal, Role};
use crate::db::models::PAGE_SIZE;
use crate::domain::{parse_date, NhsNumber, OdsCode};
use crate::error::{ApiError, Validator};
use crate::startup::AppState;
use actix_web::{web, HttpResponse};
use chrono::{DateTime, NaiveDateTime};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = AuditSearch)]
pub struct SearchBody {
    nhs_number: Option<String>,
    actor_ods: Option<String>,
    from: Option<String>,
    to: Option<String>,
    page: Option<i64>,
}

/// An instant as RFC 3339 (`2026-11-25T10:00:00Z`) or a date (midnight UTC).
fn parse_instant(s: &str) -> Result<NaiveDateTime, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(t.naive_utc());
    }
    parse_date(s)
        .map(|d| d.and_hms_opt(0, 0, 0).expect("midnight exists"))
        .map_err(|_| {
            "must be an RFC 3339 date-time such as 2026-11-25T10:00:00Z, or a date YYYY-MM-DD"
                .into()
        })
}

#[utoipa::path(post, path = "/v1/audit/search", tag = "audit", request_body = SearchBody, security(("bearer" = [])), responses((status = 200, description = "`{items, page, page_size, total}`, newest first")))]
pub async fn search(
    principal: Principal,
    state: web::Data<AppState>,
    body: ApiJson<SearchBody>,
) -> Result<HttpResponse, ApiError> {
    let role = principal.require(&[Role::Auditor])?;
    let b = body.0;
    let mut v = Validator::default();
    let nhs = v.optional("nhs_number", b.nhs_number, |s| {
        NhsNumber::parse(&s).map_err(|e| e.to_string())
    });
    let actor_ods = v.optional("actor_ods", b.actor_ods, |s| {
        if s.trim().eq_ignore_ascii_case("cli") {
            return Ok("cli".to_string());
        }
        OdsCode::parse(&s).map(|o| o.as_str().to_string())
    });
    let from = v.optional("from", b.from, |s| parse_instant(&s));
    let to = v.optional("to", b.to, |s| parse_instant(&s));
    if let (Some(f), Some(t)) = (from, to) {
        if t < f {
            v.push("to", "must not be before from");
        }
    }
    v.finish()?;
    let filter = SearchFilter {
        nhs_number: nhs.map(|n| n.as_str().to_string()),
        actor_ods,
        from,
        to,
        page: page_number(b.page)?,
    };
    let actor = principal.actor(role);
    let now = state.clock.now_naive();
    let json = state
        .db
        .write(move |conn| {
            let (rows, total) = audit::search(conn, &filter)?;
            audit::append(
                conn,
                now,
                &actor,
                Event {
                    action: "audit.search",
                    nhs_number: filter.nhs_number.as_deref(),
                    outcome: "ok",
                    detail: Some(json!({"results": rows.len()}).to_string()),
                    ..Default::default()
                },
            )?;
            Ok::<_, ApiError>(
                json!({"items": rows, "page": filter.page, "page_size": PAGE_SIZE, "total": total}),
            )
        })
        .await?;
    Ok(HttpResponse::Ok().json(json))
}

#[utoipa::path(get, path = "/v1/audit/verify", tag = "audit", security(("bearer" = [])), responses((status = 200, description = "`{ok, checked, first_broken_seq}`")))]
pub async fn verify(
    principal: Principal,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    principal.require(&[Role::Auditor])?;
    let report = state
        .db
        .run(|conn| Ok::<_, ApiError>(audit::verify(conn)?))
        .await?;
    Ok(HttpResponse::Ok().json(report))
}
