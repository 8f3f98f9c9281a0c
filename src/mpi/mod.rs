//! Identity: the `Mpi` trait that turns a patient description into a person, the built-in MPI (persons,
//! identifier links per region, probabilistic demographic matching), the PIXm/PDQm client for regions whose MPI
//! is external, and the router that picks one per region. Flags are held against NHS numbers, so every
//! resolution ends, when it can, in an NHS number.

pub mod builtin;
pub mod external;
pub mod matcher;
mod nicknames;
pub mod synthetic;

use crate::domain::{Demographics, NhsNumber};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;

/// A local identifier from a region's record system, e.g. `{system: "https://bsol.nhs.uk/mrn", value: "A123"}`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct LocalIdentifier {
    pub system: String,
    pub value: String,
}

impl std::fmt::Debug for LocalIdentifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalIdentifier({}|<redacted>)", self.system)
    }
}

/// What a caller knows about a patient. At least one part is present (the API checks).
#[derive(Debug, Clone, Default)]
pub struct PatientQuery {
    pub nhs_number: Option<NhsNumber>,
    pub identifier: Option<LocalIdentifier>,
    pub demographics: Option<Demographics>,
    /// The region of the organisation asking: which MPI knows its identifiers.
    pub region: Option<String>,
}

impl PatientQuery {
    pub fn record(&self) -> matcher::Record<'_> {
        let d = self.demographics.as_ref();
        matcher::Record {
            nhs_number: self.nhs_number.as_ref().map(|n| n.as_str()),
            given_name: d.and_then(|d| d.given_name.as_ref()).map(|n| n.as_str()),
            family_name: d.and_then(|d| d.family_name.as_ref()).map(|n| n.as_str()),
            birth_date: d.and_then(|d| d.birth_date),
            sex: d.and_then(|d| d.sex).map(|s| s.as_str()),
            postcode: d.and_then(|d| d.postcode.as_ref()).map(|p| p.as_str()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchStatus {
    Matched,
    Possible,
    None,
}

impl MatchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MatchStatus::Matched => "matched",
            MatchStatus::Possible => "possible",
            MatchStatus::None => "none",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    NhsNumber,
    Identifier,
    Demographics,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::NhsNumber => "nhs_number",
            Method::Identifier => "identifier",
            Method::Demographics => "demographics",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub person_id: Option<String>,
    pub nhs_number: Option<String>,
    pub status: MatchStatus,
    pub score: f64,
    pub parts: Vec<matcher::Part>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resolution {
    pub status: MatchStatus,
    pub method: Method,
    pub score: f64,
    /// The NHS number of the matched person (or of the best possible candidate, which is never disclosed).
    pub nhs_number: Option<String>,
    pub person_id: Option<String>,
    /// Best first.
    pub candidates: Vec<Candidate>,
    /// Why the MPI could not say more (for example an identifier system it does not know).
    pub note: Option<String>,
}

impl Resolution {
    pub fn none(method: Method) -> Self {
        Resolution {
            status: MatchStatus::None,
            method,
            score: 0.0,
            nhs_number: None,
            person_id: None,
            candidates: Vec::new(),
            note: None,
        }
    }

    pub fn matched(method: Method, nhs_number: Option<String>, person_id: Option<String>) -> Self {
        Resolution {
            status: MatchStatus::Matched,
            method,
            score: 1.0,
            nhs_number,
            person_id,
            candidates: Vec::new(),
            note: None,
        }
    }

    /// Decides matched / possible / none from scored candidates (best first). Two different people above the
    /// `matched` threshold make the answer only possible: an auto-link must never be a coin toss.
    pub fn from_candidates(mut candidates: Vec<Candidate>, thresholds: Thresholds) -> Self {
        for c in &mut candidates {
            c.status = if c.score >= thresholds.matched {
                MatchStatus::Matched
            } else if c.score >= thresholds.possible {
                MatchStatus::Possible
            } else {
                MatchStatus::None
            };
        }
        let Some(best) = candidates.first() else {
            return Resolution::none(Method::Demographics);
        };
        let rival = candidates.get(1).is_some_and(|c| {
            c.score >= thresholds.matched
                && (c.nhs_number.is_none() || c.nhs_number != best.nhs_number)
        });
        let status = if best.score >= thresholds.matched && !rival {
            MatchStatus::Matched
        } else if best.score >= thresholds.possible {
            MatchStatus::Possible
        } else {
            MatchStatus::None
        };
        Resolution {
            status,
            method: Method::Demographics,
            score: best.score,
            nhs_number: if status == MatchStatus::None {
                None
            } else {
                best.nhs_number.clone()
            },
            person_id: if status == MatchStatus::None {
                None
            } else {
                best.person_id.clone()
            },
            candidates,
            note: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub matched: f64,
    pub possible: f64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum MpiError {
    /// The MPI could not be asked (down, slow, rate-limited). The caller keeps what it has and asks again later.
    #[error("the MPI is unavailable: {0}")]
    Unavailable(String),
}

#[cfg_attr(test, mockall::automock)]
#[async_trait::async_trait]
pub trait Mpi: Send + Sync {
    async fn resolve(&self, query: &PatientQuery) -> Result<Resolution, MpiError>;

    /// When this MPI would answer `query` from cpis's own database (the built-in MPI), its thresholds, so that a
    /// caller can resolve it with [`builtin::resolve_for`] on the connection it reads with anyway.
    fn in_database(&self, _query: &PatientQuery) -> Option<Thresholds> {
        None
    }
}

/// Resolves `query` and runs `then` with the outcome. When the built-in MPI answers the query, resolution and
/// `then` share one read on one connection (on SQLite, at once on this thread; a demographic search, which scans
/// candidates, on the blocking pool); otherwise the MPI is asked first and `then` reads afterwards. Its callers
/// (the flag check, the attendance) answer only after a write of their own, so the read does not wait for the
/// writer's commits to be synced ([`crate::db::Db::read_before_write`]). `needs` says whether the caller needs a
/// person's id when the built-in MPI matches by NHS number ([`builtin::Needs`]).
pub async fn resolve_then<T, E, F>(
    mpi: &dyn Mpi,
    db: &crate::db::Db,
    query: &PatientQuery,
    needs: builtin::Needs,
    then: F,
) -> Result<T, E>
where
    F: FnOnce(&mut crate::db::DbConnection, Result<builtin::Resolved, MpiError>) -> Result<T, E>
        + Send
        + 'static,
    T: Send + 'static,
    E: From<crate::db::DbError> + Send + 'static,
{
    match mpi.in_database(query) {
        Some(thresholds) => {
            let q = query.clone();
            let job = move |conn: &mut crate::db::DbConnection| {
                let resolved = builtin::resolve_for(conn, &q, thresholds, needs)
                    .map_err(|e| MpiError::from(crate::db::DbError::Query(e)));
                then(conn, resolved)
            };
            if query.demographics.is_some() {
                db.run_before_write(job).await
            } else {
                db.read_before_write(job).await
            }
        }
        None => {
            let resolved = mpi.resolve(query).await.map(builtin::Resolved::from);
            db.read_before_write(move |conn| then(conn, resolved)).await
        }
    }
}

/// Chooses the MPI for a query: NHS numbers are national and always resolved by the built-in MPI (which holds
/// every NHS number a plan names); local identifiers and demographics go to the asking organisation's
/// region's MPI, built-in unless configuration names an external one.
pub struct MpiRouter {
    pub thresholds: Thresholds,
    pub builtin: Arc<dyn Mpi>,
    pub regions: HashMap<String, Arc<dyn Mpi>>,
}

#[async_trait::async_trait]
impl Mpi for MpiRouter {
    async fn resolve(&self, query: &PatientQuery) -> Result<Resolution, MpiError> {
        let external = query.region.as_ref().and_then(|r| self.regions.get(r));
        match external {
            None => self.builtin.resolve(query).await,
            Some(external) => {
                if query.nhs_number.is_some() {
                    let by_nhs = PatientQuery {
                        nhs_number: query.nhs_number.clone(),
                        ..Default::default()
                    };
                    let found = self.builtin.resolve(&by_nhs).await?;
                    if found.status == MatchStatus::Matched
                        || (query.identifier.is_none() && query.demographics.is_none())
                    {
                        return Ok(found);
                    }
                }
                external.resolve(query).await
            }
        }
    }

    fn in_database(&self, query: &PatientQuery) -> Option<Thresholds> {
        match query.region.as_ref().and_then(|r| self.regions.get(r)) {
            None => self.builtin.in_database(query),
            // An NHS number alone is answered by the built-in MPI whatever the region.
            Some(_) if query.identifier.is_none() && query.demographics.is_none() => {
                self.builtin.in_database(query)
            }
            Some(_) => None,
        }
    }
}

/// The router for a deployment: the built-in MPI, and a PIXm/PDQm client for each region configured so.
pub fn from_settings(
    settings: &crate::config::MpiSettings,
    db: crate::db::Db,
) -> anyhow::Result<MpiRouter> {
    let thresholds = Thresholds {
        matched: settings.matched_threshold,
        possible: settings.possible_threshold,
    };
    let mut regions: HashMap<String, Arc<dyn Mpi>> = HashMap::new();
    for (name, region) in &settings.regions {
        let name = name.to_ascii_uppercase();
        if region.kind == crate::config::MpiKind::Pixm {
            let external = external::ExternalMpi::new(
                &name,
                external::ExternalSettings {
                    base_url: region.base_url.clone().unwrap_or_default(),
                    timeout: std::time::Duration::from_millis(region.timeout_ms),
                    rate_per_second: region.rate_per_second,
                    cache_ttl: std::time::Duration::from_secs(region.cache_secs),
                },
                thresholds,
            )?;
            regions.insert(name, Arc::new(external));
        }
    }
    Ok(MpiRouter {
        thresholds,
        builtin: Arc::new(builtin::BuiltinMpi::new(db, thresholds)),
        regions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(nhs: &str, score: f64) -> Candidate {
        Candidate {
            person_id: Some(nhs.into()),
            nhs_number: Some(nhs.into()),
            status: MatchStatus::None,
            score,
            parts: vec![],
        }
    }

    const T: Thresholds = Thresholds {
        matched: 0.8,
        possible: 0.5,
    };

    #[test]
    fn thresholds_decide_and_a_close_rival_demotes_a_match() {
        assert_eq!(
            Resolution::from_candidates(vec![candidate("a", 0.9), candidate("b", 0.4)], T).status,
            MatchStatus::Matched
        );
        assert_eq!(
            Resolution::from_candidates(vec![candidate("a", 0.9), candidate("b", 0.85)], T).status,
            MatchStatus::Possible
        );
        assert_eq!(
            Resolution::from_candidates(vec![candidate("a", 0.6)], T).status,
            MatchStatus::Possible
        );
        let none = Resolution::from_candidates(vec![candidate("a", 0.3)], T);
        assert_eq!(none.status, MatchStatus::None);
        assert_eq!(none.nhs_number, None);
        assert_eq!(
            Resolution::from_candidates(vec![], T).status,
            MatchStatus::None
        );
    }

    fn query(region: &str, nhs: bool, identifier: bool) -> PatientQuery {
        PatientQuery {
            nhs_number: nhs.then(|| NhsNumber::parse("9434765919").unwrap()),
            identifier: identifier.then(|| LocalIdentifier {
                system: "urn:x".into(),
                value: "1".into(),
            }),
            demographics: None,
            region: Some(region.into()),
        }
    }

    #[tokio::test]
    async fn the_router_sends_identifiers_to_the_regions_own_mpi_and_nhs_numbers_to_the_builtin_one(
    ) {
        let mut builtin = MockMpi::new();
        builtin.expect_resolve().returning(|q| {
            Ok(if q.nhs_number.is_some() {
                Resolution::none(Method::NhsNumber)
            } else {
                Resolution::matched(Method::Identifier, None, Some("builtin".into()))
            })
        });
        let mut pixm = MockMpi::new();
        pixm.expect_resolve().times(2).returning(|_| {
            Ok(Resolution::matched(
                Method::Identifier,
                Some("9434765919".into()),
                None,
            ))
        });
        let router = MpiRouter {
            thresholds: T,
            builtin: Arc::new(builtin),
            regions: HashMap::from([("CW".to_string(), Arc::new(pixm) as Arc<dyn Mpi>)]),
        };

        let r = router.resolve(&query("BSOL", false, true)).await.unwrap();
        assert_eq!(r.person_id.as_deref(), Some("builtin"));
        let r = router.resolve(&query("CW", false, true)).await.unwrap();
        assert_eq!(r.nhs_number.as_deref(), Some("9434765919"));
        // An NHS number unknown to the built-in MPI, with an identifier: the region's MPI is asked.
        let r = router.resolve(&query("CW", true, true)).await.unwrap();
        assert_eq!(r.method, Method::Identifier);
        // An NHS number alone never leaves the built-in MPI.
        let r = router.resolve(&query("CW", true, false)).await.unwrap();
        assert_eq!(r.method, Method::NhsNumber);
    }

    #[tokio::test]
    async fn an_unavailable_external_mpi_is_reported_not_hidden() {
        let builtin = MockMpi::new();
        let mut pixm = MockMpi::new();
        pixm.expect_resolve()
            .returning(|_| Err(MpiError::Unavailable("connection refused".into())));
        let router = MpiRouter {
            thresholds: T,
            builtin: Arc::new(builtin),
            regions: HashMap::from([("CW".to_string(), Arc::new(pixm) as Arc<dyn Mpi>)]),
        };
        assert!(matches!(
            router.resolve(&query("CW", false, true)).await,
            Err(MpiError::Unavailable(_))
        ));
    }
}
