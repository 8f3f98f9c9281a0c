//! Plan endpoints for social care: register (idempotent on the local reference), read, change and search its
//! own plans. Another authority's plan answers 404, so its existence is not disclosed. Admins read all.

use super::{double_option, page_number, ApiJson};
#[allow(unused_imports)]
use crate::api::openapi::ProblemDoc;
use crate::audit::{self, Event};
use crate::auth::{Principal, Role};
use crate::db::models::{Organisation, PlanRow, StatusFilter, PAGE_SIZE};
use crate::db::stamp::Day;
use crate::db::DbConnection;
use crate::domain::{
    parse_date, parse_email, parse_phone, NhsNumber, PersonName, PlanStatus, PlanType, Postcode,
    Sex,
};
use crate::error::{ApiError, Validator};
use crate::plans::{self, check_dates, PlanBody, PlanInput, Registered};
use crate::startup::AppState;
use actix_web::{web, HttpResponse};
use chrono::{NaiveDate, NaiveDateTime};
use serde::Deserialize;
use serde_json::json;

fn la_of(conn: &mut DbConnection, row: &PlanRow) -> Result<Option<Organisation>, ApiError> {
    Ok(Organisation::find(conn, &row.la_ods)?)
}

fn not_found() -> ApiError {
    ApiError::NotFound("no plan of yours has this id".into())
}

/// Reads a plan the caller may see: its own authority's, or any for an admin.
fn visible_plan(
    conn: &mut DbConnection,
    principal: &Principal,
    role: Role,
    id: &str,
) -> Result<PlanRow, ApiError> {
    let row = PlanRow::find(conn, id)?.ok_or_else(not_found)?;
    if role != Role::Admin && row.la_ods != principal.org {
        return Err(not_found());
    }
    Ok(row)
}

#[utoipa::path(post, path = "/v1/plans", tag = "plans", request_body = PlanBody, security(("bearer" = [])), responses((status = 201, description = "Registered"), (status = 200, description = "A repeat (unchanged) or an update of the plan with this local reference"), (status = 422, body = ProblemDoc), (status = 503, description = "Not stored (database unavailable, or a conflict the database settled): send it again after `Retry-After`", body = ProblemDoc)))]
pub async fn register(
    principal: Principal,
    state: web::Data<AppState>,
    body: ApiJson<PlanBody>,
) -> Result<HttpResponse, ApiError> {
    let role = principal.require(&[Role::SocialCare])?;
    let input = PlanInput::parse(body.0, state.clock.today())?;
    let actor = principal.actor(role);
    let la = principal.org.clone();
    let now = state.clock.now_naive();
    let today = state.clock.today();
    let attempt = |input: PlanInput, actor: audit::Actor, la: String| {
        state.db.write(move |conn| {
            let (row, outcome) = plans::register(conn, now, &actor, &la, &input)?;
            let org = la_of(conn, &row)?;
            Ok::<_, ApiError>((plans::to_json(&row, org.as_ref(), today), outcome))
        })
    };
    // Two identical registrations racing on PostgreSQL: the loser hits the unique index; once more finds the
    // winner's plan and answers as a repeat.
    let result = match attempt(input.clone(), actor.clone(), la.clone()).await {
        Err(e) if is_unique_violation(&e) => attempt(input, actor, la).await,
        other => other,
    };
    let (json, outcome) = result?;
    let mut response = if outcome == Registered::Created {
        HttpResponse::Created()
    } else {
        HttpResponse::Ok()
    };
    Ok(response.json(json))
}

fn is_unique_violation(e: &ApiError) -> bool {
    if let ApiError::Internal(cause) = e {
        if let Some(crate::db::DbError::Query(diesel::result::Error::DatabaseError(kind, _))) =
            cause.downcast_ref()
        {
            return matches!(kind, diesel::result::DatabaseErrorKind::UniqueViolation);
        }
    }
    false
}

#[utoipa::path(get, path = "/v1/plans/{id}", tag = "plans", params(("id" = String, Path, description = "Plan id")), security(("bearer" = [])), responses((status = 200, description = "The plan"), (status = 404, body = ProblemDoc)))]
pub async fn read(
    principal: Principal,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let role = principal.require(&[Role::SocialCare, Role::Admin])?;
    let actor = principal.actor(role);
    let id = path.into_inner();
    let now = state.clock.now_naive();
    let today = state.clock.today();
    let json = state
        .db
        .write(move |conn| {
            let row = visible_plan(conn, &principal, role, &id)?;
            audit::append(
                conn,
                now,
                &actor,
                Event {
                    action: "plan.read",
                    nhs_number: Some(&row.nhs_number),
                    subject: Some(&row.id),
                    outcome: "ok",
                    ..Default::default()
                },
            )?;
            let org = la_of(conn, &row)?;
            Ok::<_, ApiError>(plans::to_json(&row, org.as_ref(), today))
        })
        .await?;
    Ok(HttpResponse::Ok().json(json))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchBody {
    #[serde(default, deserialize_with = "double_option")]
    end_date: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    delete_date: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    expected_delivery_date: Option<Option<String>>,
    contacts: Option<ContactsPatch>,
    child: Option<ChildPatch>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContactsPatch {
    #[serde(default, deserialize_with = "double_option")]
    office_phone: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    emergency_duty_phone: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    email: Option<Option<String>>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChildPatch {
    #[serde(default, deserialize_with = "double_option")]
    given_name: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    family_name: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    birth_date: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    sex: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    postcode: Option<Option<String>>,
}

/// Applies one merge-patch field: absent keeps `current`, `null` clears it, a value must parse.
fn merge<T>(
    v: &mut Validator,
    field: &str,
    current: Option<T>,
    patch: Option<Option<String>>,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Option<T> {
    match patch {
        None => current,
        Some(None) => None,
        Some(Some(s)) => v.check(field, parse(&s)),
    }
}

fn birth_date(today: NaiveDate) -> impl FnOnce(&str) -> Result<NaiveDate, String> {
    move |s| {
        let d = parse_date(s)?;
        if d > today {
            return Err("must not be in the future".into());
        }
        Ok(d)
    }
}

/// The plan after the patch, checked as a whole; the caller decides whether anything changed.
fn apply_patch(
    old: &PlanRow,
    patch: PatchBody,
    now: NaiveDateTime,
    today: NaiveDate,
) -> Result<PlanRow, ApiError> {
    let mut v = Validator::default();
    let mut row = old.clone();
    row.end_date = merge(&mut v, "end_date", old.end_date, patch.end_date, |s| {
        parse_date(s).map(Day)
    });
    row.delete_date = merge(
        &mut v,
        "delete_date",
        old.delete_date,
        patch.delete_date,
        |s| parse_date(s).map(Day),
    );
    row.expected_delivery_date = merge(
        &mut v,
        "expected_delivery_date",
        old.expected_delivery_date,
        patch.expected_delivery_date,
        |s| parse_date(s).map(Day),
    );
    if let Some(c) = patch.contacts {
        row.office_phone = merge(
            &mut v,
            "contacts.office_phone",
            old.office_phone.clone(),
            c.office_phone,
            parse_phone,
        );
        row.emergency_duty_phone = merge(
            &mut v,
            "contacts.emergency_duty_phone",
            old.emergency_duty_phone.clone(),
            c.emergency_duty_phone,
            parse_phone,
        );
        row.email = merge(
            &mut v,
            "contacts.email",
            old.email.clone(),
            c.email,
            parse_email,
        );
    }
    if let Some(c) = patch.child {
        let name = |s: &str| PersonName::parse(s).map(|n| n.as_str().to_string());
        row.given_name = merge(
            &mut v,
            "child.given_name",
            old.given_name.clone(),
            c.given_name,
            name,
        );
        row.family_name = merge(
            &mut v,
            "child.family_name",
            old.family_name.clone(),
            c.family_name,
            name,
        );
        row.birth_date = merge(
            &mut v,
            "child.birth_date",
            old.birth_date,
            c.birth_date,
            |s| birth_date(today)(s).map(Day),
        );
        row.sex = merge(&mut v, "child.sex", old.sex.clone(), c.sex, |s| {
            Sex::parse(s).map(|x| x.as_str().to_string())
        });
        row.postcode = merge(
            &mut v,
            "child.postcode",
            old.postcode.clone(),
            c.postcode,
            |s| Postcode::parse(s).map(|p| p.as_str().to_string()),
        );
    }
    if v.is_ok() {
        let plan_type = PlanType::parse(&row.plan_type).ok();
        check_dates(
            &mut v,
            plan_type,
            Some(*row.start_date),
            row.end_date.map(Into::into),
            row.delete_date.map(Into::into),
            row.expected_delivery_date.map(Into::into),
        );
    }
    v.finish()?;
    if row != *old {
        row.version += 1;
        row.updated_at = now.into();
    }
    Ok(row)
}

#[utoipa::path(patch, path = "/v1/plans/{id}", tag = "plans", params(("id" = String, Path, description = "Plan id")), request_body = PatchBody, security(("bearer" = [])), responses((status = 200, description = "The plan after the change"), (status = 404, body = ProblemDoc), (status = 422, body = ProblemDoc)))]
pub async fn patch(
    principal: Principal,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: ApiJson<PatchBody>,
) -> Result<HttpResponse, ApiError> {
    let role = principal.require(&[Role::SocialCare])?;
    let actor = principal.actor(role);
    let id = path.into_inner();
    let now = state.clock.now_naive();
    let today = state.clock.today();
    let patch = body.0;
    let json = state
        .db
        .write(move |conn| {
            let old = visible_plan(conn, &principal, role, &id)?;
            let row = apply_patch(&old, patch, now, today)?;
            let changed = row != old;
            if changed {
                PlanRow::update(conn, &row)?;
            }
            let ended = old.end_date != row.end_date && row.status(today) == PlanStatus::Ended;
            audit::append(
                conn,
                now,
                &actor,
                Event {
                    action: "plan.update",
                    nhs_number: Some(&row.nhs_number),
                    subject: Some(&row.id),
                    outcome: if !changed {
                        "unchanged"
                    } else if ended {
                        "ended"
                    } else {
                        "updated"
                    },
                    ..Default::default()
                },
            )?;
            let org = la_of(conn, &row)?;
            Ok::<_, ApiError>(plans::to_json(&row, org.as_ref(), today))
        })
        .await?;
    Ok(HttpResponse::Ok().json(json))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = PlanSearch)]
pub struct SearchBody {
    nhs_number: Option<String>,
    status: Option<String>,
    page: Option<i64>,
}

#[utoipa::path(post, path = "/v1/plans/search", tag = "plans", request_body = SearchBody, security(("bearer" = [])), responses((status = 200, description = "`{items, page, page_size, total}`")))]
pub async fn search(
    principal: Principal,
    state: web::Data<AppState>,
    body: ApiJson<SearchBody>,
) -> Result<HttpResponse, ApiError> {
    let role = principal.require(&[Role::SocialCare, Role::Admin])?;
    let body = body.0;
    let mut v = Validator::default();
    let nhs = v.optional("nhs_number", body.nhs_number, |s| {
        NhsNumber::parse(&s).map_err(|e| e.to_string())
    });
    let status = v.optional("status", body.status, |s| match s.as_str() {
        "active" => Ok(StatusFilter::Active),
        "ended" => Ok(StatusFilter::Ended),
        _ => Err("must be active or ended".to_string()),
    });
    v.finish()?;
    let page = page_number(body.page)?;
    let actor = principal.actor(role);
    let la = (role != Role::Admin).then(|| principal.org.clone());
    let now = state.clock.now_naive();
    let today = state.clock.today();
    let json = state
        .db
        .write(move |conn| {
            let nhs = nhs.as_ref().map(|n| n.as_str());
            let (rows, total) = PlanRow::search(
                conn,
                la.as_deref(),
                nhs,
                status.unwrap_or(StatusFilter::Any),
                today,
                page,
            )?;
            audit::append(
                conn,
                now,
                &actor,
                Event {
                    action: "plan.search",
                    nhs_number: nhs,
                    outcome: "ok",
                    detail: Some(json!({"results": rows.len()}).to_string()),
                    ..Default::default()
                },
            )?;
            let mut codes: Vec<String> = rows.iter().map(|r| r.la_ods.clone()).collect();
            codes.sort();
            codes.dedup();
            let orgs = Organisation::find_many(conn, &codes)?;
            let items: Vec<_> = rows
                .iter()
                .map(|r| plans::to_json(r, orgs.iter().find(|o| o.ods_code == r.la_ods), today))
                .collect();
            Ok::<_, ApiError>(
                json!({"items": items, "page": page, "page_size": PAGE_SIZE, "total": total}),
            )
        })
        .await?;
    Ok(HttpResponse::Ok().json(json))
}

#[utoipa::path(post, path = "/v1/plans/bulk", tag = "plans", request_body(content = String, content_type = "text/csv", description = "Header row with the plan field names, one plan per row"), security(("bearer" = [])), responses((status = 200, description = "`{file_code: CPF02|CPF03|CPF04, accepted, rejected, rows: [{row, local_reference, code: CPR06|CPR07, reasons, plan_id}]}`"), (status = 422, description = "CPF01: corrupt file, nothing changed", body = ProblemDoc), (status = 413, body = ProblemDoc), (status = 415, body = ProblemDoc)))]
/// `POST /v1/plans/bulk`: a CSV file of plans. The body is spooled to a temporary file (at most 50 MB) and
/// imported as a stream in one transaction; the answer has the file code and one code per row.
pub async fn bulk(
    principal: Principal,
    state: web::Data<AppState>,
    req: actix_web::HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    use futures_util::StreamExt;
    use std::io::{Seek, Write};
    let role = principal.require(&[Role::SocialCare])?;
    let csv = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            matches!(
                m.trim().to_ascii_lowercase().as_str(),
                "text/csv" | "application/csv"
            )
        });
    if !csv {
        return Err(ApiError::UnsupportedMediaType(
            "send the file as text/csv".into(),
        ));
    }
    let limit = crate::bulk::MAX_BYTES;
    if super::declared_length(&req).is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge(format!(
            "a plan file must be at most {limit} bytes"
        )));
    }
    let mut file = tempfile::tempfile().map_err(ApiError::internal)?;
    let mut size = 0;
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::BadRequest(format!("the file could not be read: {e}")))?;
        size += chunk.len();
        if size > limit {
            return Err(ApiError::PayloadTooLarge(format!(
                "a plan file must be at most {limit} bytes"
            )));
        }
        file.write_all(&chunk).map_err(ApiError::internal)?;
    }
    file.rewind().map_err(ApiError::internal)?;
    let actor = principal.actor(role);
    let la = principal.org.clone();
    let now = state.clock.now_naive();
    let today = state.clock.today();
    let db = state.db.clone();
    let span = tracing::Span::current();
    let result = tokio::task::spawn_blocking(move || {
        span.in_scope(|| {
            crate::bulk::import_file(
                &db,
                now,
                today,
                &actor,
                &la,
                std::io::BufReader::new(file),
                |_| {},
            )
        })
    })
    .await
    .map_err(ApiError::internal)??;
    tracing::info!(
        file_code = result.file_code,
        accepted = result.accepted,
        rejected = result.rejected,
        "plan file imported"
    );
    if result.file_code == "CPF01" {
        return Ok(HttpResponse::UnprocessableEntity()
            .content_type("application/problem+json")
            .json(json!({
                "type": "/problems/corrupt-file",
                "title": "Corrupt file",
                "status": 422,
                "detail": result.detail,
                "file_code": "CPF01",
            })));
    }
    Ok(HttpResponse::Ok().json(result))
}
