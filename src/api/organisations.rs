//! Organisations: local authorities (with their contacts), care settings, MPI sources. Created and updated by
//! an admin; readable by any key, since contacts are what a clinician needs.

use super::ApiJson;
#[allow(unused_imports)]
use crate::api::openapi::ProblemDoc;
use crate::audit::{self, Event};
use crate::auth::{Principal, Role};
use crate::clock::format_timestamp;
use crate::db::models::Organisation;
use crate::domain::{parse_email, parse_phone, parse_region, OdsCode, OrgKind};
use crate::error::{ApiError, Validator};
use crate::startup::AppState;
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrganisationBody {
    ods_code: Option<String>,
    name: Option<String>,
    kind: Option<String>,
    region: Option<String>,
    office_phone: Option<String>,
    emergency_duty_phone: Option<String>,
    email: Option<String>,
}

/// A checked organisation, ready to store.
pub struct NewOrganisation {
    pub ods_code: OdsCode,
    pub name: String,
    pub kind: OrgKind,
    pub region: Option<String>,
    pub office_phone: Option<String>,
    pub emergency_duty_phone: Option<String>,
    pub email: Option<String>,
}

pub fn parse_name(input: &str) -> Result<String, String> {
    let name = input.trim();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err("must be 1 to 200 characters without control characters".into());
    }
    Ok(name.to_string())
}

impl TryFrom<OrganisationBody> for NewOrganisation {
    type Error = ApiError;

    fn try_from(b: OrganisationBody) -> Result<Self, ApiError> {
        let mut v = Validator::default();
        let required = |v: &mut Validator, field: &str, value: Option<String>| {
            if value.is_none() {
                v.push(field, "is required");
            }
            value
        };
        let ods_code = required(&mut v, "ods_code", b.ods_code)
            .and_then(|s| v.check("ods_code", OdsCode::parse(&s)));
        let name = required(&mut v, "name", b.name).and_then(|s| v.check("name", parse_name(&s)));
        let kind =
            required(&mut v, "kind", b.kind).and_then(|s| v.check("kind", OrgKind::parse(&s)));
        let region = v.optional("region", b.region, |s| parse_region(&s));
        let office_phone = v.optional("office_phone", b.office_phone, |s| parse_phone(&s));
        let emergency_duty_phone =
            v.optional("emergency_duty_phone", b.emergency_duty_phone, |s| {
                parse_phone(&s)
            });
        let email = v.optional("email", b.email, |s| parse_email(&s));
        v.finish()?;
        Ok(NewOrganisation {
            ods_code: ods_code.expect("validated"),
            name: name.expect("validated"),
            kind: kind.expect("validated"),
            region,
            office_phone,
            emergency_duty_phone,
            email,
        })
    }
}

/// Creates or updates an organisation with its audit event; answers whether it was new.
pub fn store(
    conn: &mut crate::db::DbConnection,
    now: chrono::NaiveDateTime,
    actor: &audit::Actor,
    org: NewOrganisation,
) -> Result<(Organisation, bool), ApiError> {
    let row = Organisation {
        ods_code: org.ods_code.as_str().to_string(),
        name: org.name,
        kind: org.kind.as_str().to_string(),
        region: org.region,
        office_phone: org.office_phone,
        emergency_duty_phone: org.emergency_duty_phone,
        email: org.email,
        created_at: now.into(),
        updated_at: now.into(),
    };
    let created = Organisation::upsert(conn, &row)?;
    audit::append(
        conn,
        now,
        actor,
        Event {
            action: if created {
                "organisation.create"
            } else {
                "organisation.update"
            },
            subject: Some(&row.ods_code),
            outcome: "ok",
            ..Default::default()
        },
    )?;
    let stored = Organisation::find(conn, &row.ods_code)?
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("organisation vanished")))?;
    Ok((stored, created))
}

pub fn to_json(o: &Organisation) -> Value {
    json!({
        "ods_code": o.ods_code,
        "name": o.name,
        "kind": o.kind,
        "region": o.region,
        "office_phone": o.office_phone,
        "emergency_duty_phone": o.emergency_duty_phone,
        "email": o.email,
        "created_at": format_timestamp(o.created_at),
        "updated_at": format_timestamp(o.updated_at),
    })
}

#[utoipa::path(post, path = "/v1/organisations", tag = "organisations", request_body = OrganisationBody, security(("bearer" = [])), responses((status = 201, description = "Created"), (status = 200, description = "Updated"), (status = 422, body = ProblemDoc)))]
pub async fn upsert(
    principal: Principal,
    state: web::Data<AppState>,
    body: ApiJson<OrganisationBody>,
) -> Result<HttpResponse, ApiError> {
    let role = principal.require(&[Role::Admin])?;
    let org = NewOrganisation::try_from(body.0)?;
    let actor = principal.actor(role);
    let now = state.clock.now_naive();
    let (stored, created) = state
        .db
        .write(move |conn| store(conn, now, &actor, org))
        .await?;
    // A key's cached region comes from its organisation.
    state.keys.invalidate_all();
    let mut response = if created {
        HttpResponse::Created()
    } else {
        HttpResponse::Ok()
    };
    Ok(response.json(to_json(&stored)))
}

#[utoipa::path(get, path = "/v1/organisations/{ods}", tag = "organisations", params(("ods" = String, Path, description = "ODS code")), security(("bearer" = [])), responses((status = 200, description = "The organisation"), (status = 404, body = ProblemDoc)))]
pub async fn read(
    _principal: Principal,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let ods = OdsCode::parse(&path.into_inner())
        .map_err(|_| ApiError::NotFound("no organisation has this ODS code".into()))?;
    let found = state
        .db
        .run(move |conn| Ok::<_, ApiError>(Organisation::find(conn, ods.as_str())?))
        .await?
        .ok_or_else(|| ApiError::NotFound("no organisation has this ODS code".into()))?;
    Ok(HttpResponse::Ok().json(to_json(&found)))
}
