//! API keys: made and revoked by an admin. The secret is in the creation answer only.

use super::ApiJson;
#[allow(unused_imports)]
use crate::api::openapi::ProblemDoc;
use crate::audit::{self, Event};
use crate::auth::{encode_roles, generate_key, Principal, Role};
use crate::db::models::{ApiKeyRow, Organisation};
use crate::domain::OdsCode;
use crate::error::{ApiError, Validator};
use crate::startup::AppState;
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    org: Option<String>,
    roles: Option<Vec<String>>,
}

/// Validates and stores a new key for an organisation, with its audit event; answers `(id, secret)`.
pub fn create_key(
    conn: &mut crate::db::DbConnection,
    now: chrono::NaiveDateTime,
    actor: &audit::Actor,
    org: &OdsCode,
    roles: &[Role],
) -> Result<(String, String), ApiError> {
    if Organisation::find(conn, org.as_str())?.is_none() {
        return Err(ApiError::validation(
            "org",
            "no organisation has this ODS code; create it first",
        ));
    }
    let key = generate_key();
    let row = ApiKeyRow {
        id: uuid::Uuid::new_v4().to_string(),
        org_ods: org.as_str().to_string(),
        roles: encode_roles(roles),
        key_hash: key.hash,
        created_at: now.into(),
        revoked_at: None,
    };
    ApiKeyRow::insert(conn, &row)?;
    audit::append(
        conn,
        now,
        actor,
        Event {
            action: "key.create",
            subject: Some(&row.id),
            outcome: "created",
            detail: Some(json!({"org": row.org_ods, "roles": row.roles}).to_string()),
            ..Default::default()
        },
    )?;
    Ok((row.id, key.secret))
}

pub fn parse_roles(v: &mut Validator, roles: Option<Vec<String>>) -> Vec<Role> {
    let mut parsed = Vec::new();
    match roles {
        None => v.push("roles", "is required"),
        Some(list) if list.is_empty() => v.push("roles", "must name at least one role"),
        Some(list) => {
            for (i, r) in list.iter().enumerate() {
                if let Some(role) = v.check(&format!("roles[{i}]"), Role::parse(r)) {
                    if !parsed.contains(&role) {
                        parsed.push(role);
                    }
                }
            }
        }
    }
    parsed
}

#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = CreateKey, security(("bearer" = [])), responses((status = 201, description = "`{id, key, org, roles}`: the key is shown only here"), (status = 403, body = ProblemDoc), (status = 422, body = ProblemDoc)))]
pub async fn create(
    principal: Principal,
    state: web::Data<AppState>,
    body: ApiJson<CreateKey>,
) -> Result<HttpResponse, ApiError> {
    let role = principal.require(&[Role::Admin])?;
    let body = body.0;
    let mut v = Validator::default();
    let org = match body.org {
        None => {
            v.push("org", "is required");
            None
        }
        Some(o) => v.check("org", OdsCode::parse(&o)),
    };
    let roles = parse_roles(&mut v, body.roles);
    v.finish()?;
    let org = org.expect("validated");
    let actor = principal.actor(role);
    let now = state.clock.now_naive();
    let answer_roles: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    let org_code = org.as_str().to_string();
    let (id, secret) = state
        .db
        .write(move |conn| create_key(conn, now, &actor, &org, &roles))
        .await?;
    Ok(HttpResponse::Created()
        .json(json!({"id": id, "key": secret, "org": org_code, "roles": answer_roles})))
}

#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys", params(("id" = String, Path, description = "Key id")), security(("bearer" = [])), responses((status = 204, description = "Revoked"), (status = 404, body = ProblemDoc)))]
pub async fn revoke(
    principal: Principal,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let role = principal.require(&[Role::Admin])?;
    let actor = principal.actor(role);
    let now = state.clock.now_naive();
    let key_id = path.into_inner();
    state
        .db
        .write(move |conn| revoke_key(conn, now, &actor, &key_id))
        .await?;
    // A revoked key must stop working at once: forget every cached key in this process.
    state.keys.invalidate_all();
    Ok(HttpResponse::NoContent().finish())
}

pub fn revoke_key(
    conn: &mut crate::db::DbConnection,
    now: chrono::NaiveDateTime,
    actor: &audit::Actor,
    key_id: &str,
) -> Result<(), ApiError> {
    if !ApiKeyRow::revoke(conn, key_id, now)? {
        return Err(ApiError::NotFound("no active key has this id".into()));
    }
    audit::append(
        conn,
        now,
        actor,
        Event {
            action: "key.revoke",
            subject: Some(key_id),
            outcome: "revoked",
            ..Default::default()
        },
    )?;
    Ok(())
}
