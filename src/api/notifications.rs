//! Delivery endpoints and notifications: an authority says where it is told (emails, a signed webhook, which
//! events), reads what it was told and how each delivery went, and asks for a notification again.

use super::{page_number, ApiJson};
#[allow(unused_imports)]
use crate::api::openapi::ProblemDoc;
use crate::audit::{self, Event};
use crate::auth::{Principal, Role};
use crate::clock::format_timestamp;
use crate::db::models::Organisation;
use crate::db::schema::{deliveries, notifications};
use crate::db::stamp::Stamp;
use crate::db::DbConnection;
use crate::domain::{parse_email, OdsCode};
use crate::error::{ApiError, Validator};
use crate::notify::webhook::{check_url, generate_secret, parse_secret, TargetPolicy};
use crate::notify::{self, add_channels, refresh_status, EndpointRow, NotificationRow, EVENTS};
use crate::startup::AppState;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, NaiveDateTime};
use diesel::prelude::*;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeliveryBody {
    email: Option<Vec<String>>,
    #[serde(default, deserialize_with = "super::double_option")]
    webhook: Option<Option<WebhookBody>>,
    events: Option<Vec<String>>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookBody {
    url: Option<String>,
    secret: Option<String>,
}

/// How long the previous webhook secret still signs after a rotation, so receivers can switch over.
const ROTATION_OVERLAP_HOURS: i64 = 24;

#[utoipa::path(put, path = "/v1/organisations/{ods}/delivery", tag = "notifications", params(("ods" = String, Path, description = "ODS code")), request_body = DeliveryBody, security(("bearer" = [])), responses((status = 200, description = "The endpoints; a generated webhook secret is shown once"), (status = 403, body = ProblemDoc), (status = 422, body = ProblemDoc)))]
pub async fn put_delivery(
    principal: Principal,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: ApiJson<DeliveryBody>,
) -> Result<HttpResponse, ApiError> {
    let role = principal.require(&[Role::Admin, Role::SocialCare])?;
    let org = OdsCode::parse(&path.into_inner())
        .map_err(|_| ApiError::NotFound("no organisation has this ODS code".into()))?;
    if role != Role::Admin && org.as_str() != principal.org {
        return Err(ApiError::Forbidden(
            "an authority manages only its own delivery endpoints".into(),
        ));
    }
    let b = body.0;
    let policy = TargetPolicy {
        allow_private: state.settings.webhook.allow_private_targets,
        allow_http: state.settings.webhook.allow_http,
    };
    let mut v = Validator::default();
    let emails: Vec<String> = b
        .email
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(i, e)| v.check(&format!("email[{i}]"), parse_email(&e)))
        .collect();
    if emails.len() > 10 {
        v.push("email", "at most 10 addresses");
    }
    let webhook = match b.webhook {
        None | Some(None) => None,
        Some(Some(w)) => {
            let url = match w.url {
                None => {
                    v.push("webhook.url", "is required");
                    None
                }
                Some(u) => v.check("webhook.url", check_url(&u, policy).map(|u| u.to_string())),
            };
            let secret = v.optional("webhook.secret", w.secret, |s| parse_secret(&s));
            url.map(|u| (u, secret))
        }
    };
    let events: Vec<String> = match b.events {
        None => vec![
            notify::ATTENDANCE_FLAGGED.into(),
            notify::FLAG_ACCESSED.into(),
        ],
        Some(list) => list
            .into_iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let ok = EVENTS.contains(&e.as_str());
                v.check(
                    &format!("events[{i}]"),
                    if ok {
                        Ok(e)
                    } else {
                        Err(format!("must be one of {}", EVENTS.join(", ")))
                    },
                )
            })
            .collect(),
    };
    v.finish()?;
    let actor = principal.actor(role);
    let now = state.clock.now_naive();
    let answer = state
        .db
        .write(move |conn| {
            if Organisation::find(conn, org.as_str())?.is_none() {
                return Err(ApiError::NotFound("no organisation has this ODS code".into()));
            }
            let old = EndpointRow::find(conn, org.as_str())?;
            let mut generated = None;
            let (url, secret, previous, previous_until) = match webhook {
                None => (None, None, None, None),
                Some((url, given)) => {
                    let current = old.as_ref().and_then(|o| o.webhook_secret.clone());
                    match (given, current) {
                        (Some(new), Some(cur)) if new != cur => {
                            (Some(url), Some(new), Some(cur), Some((now + chrono::Duration::hours(ROTATION_OVERLAP_HOURS)).into()))
                        }
                        (Some(new), _) => (Some(url), Some(new), None, None),
                        (None, Some(cur)) => {
                            let keep = old.as_ref().map(|o| (o.webhook_previous_secret.clone(), o.previous_secret_until)).unwrap_or_default();
                            (Some(url), Some(cur), keep.0, keep.1)
                        }
                        (None, None) => {
                            let s = generate_secret();
                            generated = Some(s.clone());
                            (Some(url), Some(s), None, None)
                        }
                    }
                }
            };
            let row = EndpointRow {
                org_ods: org.as_str().to_string(),
                emails: emails.join(","),
                webhook_url: url,
                webhook_secret: secret,
                webhook_previous_secret: previous,
                previous_secret_until: previous_until,
                webhook_disabled_at: None,
                events: events.join(","),
                updated_at: now.into(),
            };
            EndpointRow::upsert(conn, &row)?;
            // Notifications recorded while the authority had no channel now get one.
            let waiting: Vec<NotificationRow> = notifications::table
                .filter(notifications::org_ods.eq(org.as_str()))
                .filter(notifications::status.eq(notify::PENDING))
                .filter(diesel::dsl::not(diesel::dsl::exists(
                    deliveries::table.filter(deliveries::notification_id.eq(notifications::id)),
                )))
                .select(NotificationRow::as_select())
                .load(conn)?;
            for n in &waiting {
                add_channels(conn, n, Some(&row), now)?;
            }
            audit::append(conn, now, &actor, Event {
                action: "delivery.configure",
                subject: Some(org.as_str()),
                outcome: "ok",
                detail: Some(json!({"emails": emails.len(), "webhook": row.webhook_url.is_some(), "events": row.events, "rotated": row.webhook_previous_secret.is_some()}).to_string()),
                ..Default::default()
            })?;
            let mut webhook = row.webhook_url.as_ref().map(|u| json!({"url": u, "disabled": false}));
            if let (Some(w), Some(s)) = (webhook.as_mut(), generated) {
                w["secret"] = json!(s);
            }
            Ok((json!({"org": row.org_ods, "email": emails, "webhook": webhook, "events": events}), !waiting.is_empty()))
        })
        .await?;
    if answer.1 {
        state.wake_deliverer();
    }
    Ok(HttpResponse::Ok().json(answer.0))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    status: Option<String>,
    since: Option<String>,
    page: Option<i64>,
}

fn channel_json(
    conn: &mut DbConnection,
    n: &NotificationRow,
) -> Result<(Value, Value), diesel::result::Error> {
    let channels: Vec<Value> = NotificationRow::deliveries(conn, &n.id)?
        .into_iter()
        .map(|d| {
            json!({"channel": d.channel, "status": d.status, "attempts": d.attempts,
                   "next_attempt_at": (d.status == notify::PENDING).then(|| format_timestamp(d.next_attempt_at)),
                   "last_error": d.last_error, "delivered_at": d.delivered_at.map(format_timestamp)})
        })
        .collect();
    let attempts: Vec<Value> = NotificationRow::attempts(conn, &n.id)?
        .into_iter()
        .map(|a| {
            json!({"channel": a.channel, "at": format_timestamp(a.at), "outcome": a.outcome, "response_code": a.response_code,
                   "error": a.error, "duration_ms": a.duration_ms})
        })
        .collect();
    Ok((json!(channels), json!(attempts)))
}

fn summary(conn: &mut DbConnection, n: &NotificationRow) -> Result<Value, diesel::result::Error> {
    let (channels, attempts) = channel_json(conn, n)?;
    Ok(json!({
        "id": n.id, "org_ods": n.org_ods, "event": n.event, "status": n.status, "review": n.review,
        "occurred_at": format_timestamp(n.occurred_at), "created_at": format_timestamp(n.created_at),
        "setting_ods": n.setting_ods, "setting_type": n.setting_type,
        "deliveries": channels, "attempts": attempts,
    }))
}

#[utoipa::path(get, path = "/v1/notifications", tag = "notifications", params(ListQuery), security(("bearer" = [])), responses((status = 200, description = "Notifications with their deliveries and attempts, newest first")))]
pub async fn list(
    principal: Principal,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let role = principal.require(&[Role::SocialCare, Role::Admin])?;
    let q = web::Query::<ListQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::validation("query", e.to_string()))?
        .into_inner();
    let mut v = Validator::default();
    let status = v.optional("status", q.status, |s| match s.as_str() {
        notify::PENDING | notify::DELIVERED | notify::DEAD => Ok(s),
        _ => Err("must be pending, delivered or dead".into()),
    });
    let since: Option<NaiveDateTime> = v.optional("since", q.since, |s| {
        DateTime::parse_from_rfc3339(&s)
            .map(|d| d.naive_utc())
            .map_err(|_| "must be an RFC 3339 date-time".to_string())
    });
    v.finish()?;
    let page = page_number(q.page)?;
    let org = (role != Role::Admin).then(|| principal.org.clone());
    let items = state
        .db
        .run(move |conn| {
            let mut query = notifications::table.into_boxed();
            if let Some(o) = &org {
                query = query.filter(notifications::org_ods.eq(o.clone()));
            }
            if let Some(s) = &status {
                query = query.filter(notifications::status.eq(s.clone()));
            }
            if let Some(t) = since {
                query = query.filter(notifications::created_at.ge(Stamp(t)));
            }
            let rows: Vec<NotificationRow> = query
                .order((notifications::created_at.desc(), notifications::id.asc()))
                .limit(100)
                .offset((page - 1) * 100)
                .select(NotificationRow::as_select())
                .load(conn)?;
            rows.iter()
                .map(|n| summary(conn, n))
                .collect::<Result<Vec<_>, _>>()
                .map_err(ApiError::from)
        })
        .await?;
    Ok(HttpResponse::Ok().json(json!({"items": items, "page": page, "page_size": 100})))
}

fn visible(
    conn: &mut DbConnection,
    principal: &Principal,
    role: Role,
    id: &str,
) -> Result<NotificationRow, ApiError> {
    let n = NotificationRow::find(conn, id)?
        .ok_or_else(|| ApiError::NotFound("no notification of yours has this id".into()))?;
    if role != Role::Admin && n.org_ods != principal.org {
        return Err(ApiError::NotFound(
            "no notification of yours has this id".into(),
        ));
    }
    Ok(n)
}

#[utoipa::path(get, path = "/v1/notifications/{id}", tag = "notifications", params(("id" = String, Path, description = "Notification id")), security(("bearer" = [])), responses((status = 200, description = "The notification with its event body"), (status = 404, body = ProblemDoc)))]
pub async fn read(
    principal: Principal,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let role = principal.require(&[Role::SocialCare, Role::Admin])?;
    let actor = principal.actor(role);
    let id = path.into_inner();
    let now = state.clock.now_naive();
    let answer = state
        .db
        .write(move |conn| {
            let n = visible(conn, &principal, role, &id)?;
            let mut v = summary(conn, &n)?;
            v["nhs_number"] = json!(n.nhs_number);
            v["attendance_ref"] = json!(n.attendance_ref);
            v["payload"] = n
                .payload
                .as_deref()
                .and_then(|p| serde_json::from_str(p).ok())
                .unwrap_or(Value::Null);
            audit::append(
                conn,
                now,
                &actor,
                Event {
                    action: "notification.read",
                    nhs_number: n.nhs_number.as_deref(),
                    subject: Some(&n.id),
                    outcome: "ok",
                    ..Default::default()
                },
            )?;
            Ok::<_, ApiError>(v)
        })
        .await?;
    Ok(HttpResponse::Ok().json(answer))
}

#[utoipa::path(post, path = "/v1/notifications/{id}/redeliver", tag = "notifications", params(("id" = String, Path, description = "Notification id")), security(("bearer" = [])), responses((status = 202, description = "Queued again"), (status = 409, body = ProblemDoc), (status = 404, body = ProblemDoc)))]
pub async fn redeliver(
    principal: Principal,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let role = principal.require(&[Role::SocialCare, Role::Admin])?;
    let actor = principal.actor(role);
    let id = path.into_inner();
    let now = state.clock.now_naive();
    let answer = state
        .db
        .write(move |conn| {
            let n = visible(conn, &principal, role, &id)?;
            if n.status == notify::PENDING {
                return Err(ApiError::Conflict(
                    "the notification is still being delivered".into(),
                ));
            }
            let channels =
                diesel::update(deliveries::table.filter(deliveries::notification_id.eq(&n.id)))
                    .set((
                        deliveries::status.eq(notify::PENDING),
                        deliveries::attempts.eq(0),
                        deliveries::next_attempt_at.eq(Stamp(now)),
                        deliveries::lease_until.eq(None::<Stamp>),
                        deliveries::leased_by.eq(None::<String>),
                        deliveries::last_error.eq(None::<String>),
                        deliveries::delivered_at.eq(None::<Stamp>),
                    ))
                    .execute(conn)?;
            if channels == 0 {
                let endpoint = EndpointRow::find(conn, &n.org_ods)?;
                add_channels(conn, &n, endpoint.as_ref(), now)?;
            }
            let status = refresh_status(conn, &n.id, now)?;
            audit::append(
                conn,
                now,
                &actor,
                Event {
                    action: "notification.redeliver",
                    nhs_number: n.nhs_number.as_deref(),
                    subject: Some(&n.id),
                    outcome: "queued",
                    ..Default::default()
                },
            )?;
            Ok::<_, ApiError>(json!({"id": n.id, "status": status}))
        })
        .await?;
    state.wake_deliverer();
    Ok(HttpResponse::Accepted().json(answer))
}
