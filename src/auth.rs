//! API keys and roles. A key is 256 random bits shown once; only its SHA-256 is stored (a slow hash adds nothing
//! for a secret of that entropy). Every `/v1` and `/fhir` request is authenticated by middleware before any
//! body is read; handlers then ask the `Principal` for the role they need.

use crate::audit::Actor;
use crate::db::models::ApiKeyRow;
use crate::error::ApiError;
use crate::startup::AppState;
use crate::telemetry::RequestId;
use actix_web::body::{BoxBody, EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, FromRequest, HttpMessage, HttpRequest};
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::future::{ready, Ready};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    CareSetting,
    SocialCare,
    MpiFeed,
    Auditor,
    Admin,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::CareSetting,
        Role::SocialCare,
        Role::MpiFeed,
        Role::Auditor,
        Role::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::CareSetting => "care_setting",
            Role::SocialCare => "social_care",
            Role::MpiFeed => "mpi_feed",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        }
    }

    pub fn parse(input: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == input.trim())
            .ok_or_else(|| {
                "must be one of care_setting, social_care, mpi_feed, auditor, admin".to_string()
            })
    }
}

/// A freshly made key: the secret to show once, and the hash to store.
pub struct NewKey {
    pub secret: String,
    pub hash: String,
}

pub fn generate_key() -> NewKey {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!(
        "cpis_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = hash_key(&secret);
    NewKey { secret, hash }
}

pub fn hash_key(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

pub fn encode_roles(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

pub fn decode_roles(stored: &str) -> Vec<Role> {
    stored
        .split(',')
        .filter_map(|r| Role::parse(r).ok())
        .collect()
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: String,
    pub org: String,
    /// The organisation's name, as cached with the key (a change to the organisation empties the cache).
    pub org_name: String,
    pub roles: Vec<Role>,
    pub request_id: String,
    /// The region of the key's organisation: whose MPI knows its local identifiers.
    pub region: Option<String>,
}

impl Principal {
    /// The first of `allowed` that the key holds, or 403.
    pub fn require(&self, allowed: &[Role]) -> Result<Role, ApiError> {
        allowed
            .iter()
            .copied()
            .find(|r| self.roles.contains(r))
            .ok_or_else(|| {
                let names: Vec<_> = allowed.iter().map(|r| r.as_str()).collect();
                ApiError::Forbidden(format!(
                    "this API key needs one of the roles: {}",
                    names.join(", ")
                ))
            })
    }

    pub fn actor(&self, role: Role) -> Actor {
        Actor {
            org: self.org.clone(),
            key_id: Some(self.key_id.clone()),
            role: Some(role.as_str().to_string()),
            request_id: Some(self.request_id.clone()),
            practitioner: None,
        }
    }
}

impl FromRequest for Principal {
    type Error = ApiError;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(
            req.extensions()
                .get::<Principal>()
                .cloned()
                .ok_or(ApiError::Unauthenticated {
                    detail: "an API key is required",
                }),
        )
    }
}

fn bearer_token(req: &ServiceRequest) -> Result<&str, ApiError> {
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .ok_or(ApiError::Unauthenticated {
            detail: "send the API key as `Authorization: Bearer <key>`",
        })?;
    let value = header.to_str().map_err(|_| ApiError::Unauthenticated {
        detail: "the Authorization header is not valid text",
    })?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(ApiError::Unauthenticated {
            detail: "the Authorization header must use the Bearer scheme",
        }),
    }
}

/// Middleware: resolves the bearer key to a `Principal`, or answers 401 before the handler runs. The refusal is
/// an answer, not an error passed outwards, so that the request's span logs it and the metrics count it.
pub async fn authenticate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody, BoxBody>>, actix_web::Error> {
    match principal(&req).await {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            Ok(next.call(req).await?.map_into_left_body())
        }
        Err(e) => Ok(req.error_response(e).map_into_right_body()),
    }
}

/// The caller named by the request's bearer key.
async fn principal(req: &ServiceRequest) -> Result<Principal, ApiError> {
    let token = bearer_token(req)?;
    let hash = hash_key(token);
    let state = req
        .app_data::<web::Data<AppState>>()
        .cloned()
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("application state missing")))?;
    let row = match state.keys.get(&hash) {
        Some(hit) => Some(hit),
        None => {
            let key = hash.clone();
            let found = state
                .db
                .run(move |conn| Ok::<_, ApiError>(ApiKeyRow::find_active_by_hash(conn, &key)?))
                .await?;
            if let Some(f) = &found {
                state.keys.insert(hash, f.clone());
            }
            found
        }
    };
    let (row, org) = row.ok_or(ApiError::Unauthenticated {
        detail: "the API key is unknown or revoked",
    })?;
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    tracing::Span::current().record("org", row.org_ods.as_str());
    Ok(Principal {
        key_id: row.id,
        org: row.org_ods,
        org_name: org.name,
        roles: decode_roles(&row.roles),
        request_id,
        region: org.region,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_long_and_stored_only_as_hashes() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a.secret, b.secret);
        // 32 bytes in unpadded base64url is 43 characters.
        assert_eq!(a.secret.len(), "cpis_".len() + 43);
        assert_eq!(a.hash, hash_key(&a.secret));
        assert!(!a.hash.contains(&a.secret));
    }

    #[test]
    fn roles_round_trip_through_storage() {
        let roles = [Role::Admin, Role::Auditor];
        assert_eq!(decode_roles(&encode_roles(&roles)), roles);
        assert!(Role::parse("root").is_err());
    }

    #[test]
    fn require_names_the_missing_roles() {
        let p = Principal {
            key_id: "k".into(),
            org: "X01".into(),
            org_name: "X".into(),
            roles: vec![Role::Auditor],
            request_id: "r".into(),
            region: None,
        };
        assert_eq!(
            p.require(&[Role::Admin, Role::Auditor]).unwrap(),
            Role::Auditor
        );
        match p.require(&[Role::SocialCare]) {
            Err(ApiError::Forbidden(d)) => assert!(d.contains("social_care")),
            other => panic!("expected 403, got {other:?}"),
        }
    }
}
