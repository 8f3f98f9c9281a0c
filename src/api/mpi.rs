//! MPI endpoints: regional feeds link their local identifiers to persons; admins ask how a patient resolves,
//! with every candidate's score and its parts.

use super::patient::{parse_identifier, parse_patient, IdentifierBody, PatientBody};
use super::ApiJson;
#[allow(unused_imports)]
use crate::api::openapi::ProblemDoc;
use crate::audit::{self, Event};
use crate::auth::{Principal, Role};
use crate::domain::{parse_region, NhsNumber};
use crate::error::{ApiError, Validator};
use crate::flags;
use crate::mpi::builtin::{self, can_match, Linked};
use crate::mpi::{MatchStatus, Resolution};
use crate::plans::{parse_child, ChildBody};
use crate::startup::AppState;
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkBody {
    identifier: Option<IdentifierBody>,
    nhs_number: Option<String>,
    demographics: Option<ChildBody>,
}

#[utoipa::path(post, path = "/v1/mpi/links", tag = "mpi", request_body = LinkBody, security(("bearer" = [])), responses((status = 201, description = "Linked"), (status = 200, description = "Already linked, or moved to this person"), (status = 422, body = ProblemDoc)))]
pub async fn link(
    principal: Principal,
    state: web::Data<AppState>,
    body: ApiJson<LinkBody>,
) -> Result<HttpResponse, ApiError> {
    let role = principal.require(&[Role::MpiFeed])?;
    let region = principal.region.clone().ok_or_else(|| {
        ApiError::Unprocessable(
            "this feed's organisation has no region; an admin must set one".into(),
        )
    })?;
    let b = body.0;
    let today = state.clock.today();
    let mut v = Validator::default();
    let identifier = match b.identifier {
        None => {
            v.push("identifier", "is required");
            None
        }
        Some(i) => parse_identifier(&mut v, "identifier", i),
    };
    let nhs = v.optional("nhs_number", b.nhs_number, |s| {
        NhsNumber::parse(&s).map_err(|e| e.to_string())
    });
    let demographics = b
        .demographics
        .map(|d| parse_child(&mut v, "demographics.", d, today))
        .unwrap_or_default();
    if v.is_ok() && nhs.is_none() && !can_match(&demographics) {
        v.push(
            "nhs_number",
            "is required unless demographics carry a birth date and a name",
        );
    }
    v.finish()?;
    let identifier = identifier.expect("validated");
    let actor = principal.actor(role);
    let now = state.clock.now_naive();
    let thresholds = state.settings.mpi.clone();
    let (json, linked) = state
        .db
        .write(move |conn| {
            let (person_id, matched) = match &nhs {
                Some(n) => (
                    builtin::upsert_person(conn, now, Some(n.as_str()), &demographics)?,
                    None,
                ),
                None => {
                    let record = crate::mpi::PatientQuery {
                        demographics: Some(demographics.clone()),
                        ..Default::default()
                    };
                    let candidates = builtin::score_candidates(conn, &record.record())?;
                    let r = Resolution::from_candidates(
                        candidates,
                        crate::mpi::Thresholds {
                            matched: thresholds.matched_threshold,
                            possible: thresholds.possible_threshold,
                        },
                    );
                    match (r.status, &r.person_id) {
                        (MatchStatus::Matched, Some(id)) => (id.clone(), Some(r)),
                        _ => (
                            builtin::upsert_person(conn, now, None, &demographics)?,
                            Some(r),
                        ),
                    }
                }
            };
            let linked = builtin::link_identifier(conn, now, &region, &identifier, &person_id)?;
            let person = builtin::PersonRow::find(conn, &person_id)?
                .ok_or_else(|| ApiError::internal(anyhow::anyhow!("person vanished")))?;
            audit::append(
                conn,
                now,
                &actor,
                Event {
                    action: "mpi.link",
                    nhs_number: person.nhs_number.as_deref(),
                    subject: Some(&person_id),
                    outcome: linked.as_str(),
                    detail: Some(
                        json!({"region": region, "system": identifier.system}).to_string(),
                    ),
                },
            )?;
            Ok::<_, ApiError>((
                json!({
                    "person_id": person_id,
                    "nhs_number": person.nhs_number,
                    "region": region,
                    "link": linked.as_str(),
                    "match": matched.as_ref().map(flags::match_json),
                }),
                linked,
            ))
        })
        .await?;
    let mut response = if linked == Linked::Created {
        HttpResponse::Created()
    } else {
        HttpResponse::Ok()
    };
    Ok(response.json(json))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveBody {
    patient: Option<PatientBody>,
    /// Resolve as an organisation of this region would (its identifiers, its MPI).
    region: Option<String>,
}

#[utoipa::path(post, path = "/v1/mpi/resolve", tag = "mpi", request_body = ResolveBody, security(("bearer" = [])), responses((status = 200, description = "`{match, nhs_number, person_id, candidates: [{nhs_number, person_id, status, score, parts}], note}`")))]
pub async fn resolve(
    principal: Principal,
    state: web::Data<AppState>,
    body: ApiJson<ResolveBody>,
) -> Result<HttpResponse, ApiError> {
    let role = principal.require(&[Role::Admin])?;
    let b = body.0;
    let mut v = Validator::default();
    let region = v
        .optional("region", b.region, |s| parse_region(&s))
        .or(principal.region.clone());
    let query = parse_patient(&mut v, b.patient, state.clock.today(), region);
    v.finish()?;
    let query = query.expect("validated");
    let r = state
        .mpi
        .resolve(&query)
        .await
        .map_err(super::flag_checks::mpi_unavailable)?;
    let actor = principal.actor(role);
    let now = state.clock.now_naive();
    let answer = json!({
        "match": flags::match_json(&r),
        "nhs_number": if r.status == MatchStatus::Matched { r.nhs_number.clone() } else { None },
        "person_id": r.person_id,
        "candidates": r.candidates,
        "note": r.note,
    });
    let audited = r
        .nhs_number
        .clone()
        .or(query.nhs_number.as_ref().map(|n| n.as_str().to_string()));
    state
        .db
        .write(move |conn| {
            audit::append(
                conn,
                now,
                &actor,
                Event {
                    action: "mpi.resolve",
                    nhs_number: audited.as_deref(),
                    outcome: r.status.as_str(),
                    ..Default::default()
                },
            )
            .map_err(ApiError::from)
        })
        .await?;
    Ok(HttpResponse::Ok().json(answer))
}
