//! The MPI of a region whose record system runs its own: IHE PIXm (ITI-83, `Patient/$ihe-pix`) for local
//! identifiers and PDQm (ITI-119, `Patient/$match`) for demographics, over FHIR R4 JSON. Each region's client has
//! a timeout, a rate limit (national PDS allows 5 requests/s), and a short cache. Down, slow or overloaded is
//! `MpiError::Unavailable` (ask again later); a definite answer, including "unknown identifier system", is a
//! `Resolution`.

use super::{
    Candidate, LocalIdentifier, MatchStatus, Method, Mpi, MpiError, PatientQuery, Resolution,
    Thresholds,
};
use crate::domain::NhsNumber;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::{json, Value};
use std::num::NonZeroU32;
use std::time::Duration;

pub const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
const MATCH_GRADE: &str = "http://hl7.org/fhir/StructureDefinition/match-grade";

#[derive(Debug, Clone)]
pub struct ExternalSettings {
    pub base_url: String,
    pub timeout: Duration,
    pub rate_per_second: u32,
    pub cache_ttl: Duration,
}

pub struct ExternalMpi {
    region: String,
    settings: ExternalSettings,
    client: reqwest::Client,
    limiter: DefaultDirectRateLimiter,
    cache: moka::sync::Cache<String, Resolution>,
    thresholds: Thresholds,
}

impl ExternalMpi {
    pub fn new(
        region: &str,
        settings: ExternalSettings,
        thresholds: Thresholds,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let rate = NonZeroU32::new(settings.rate_per_second.max(1)).expect("at least 1");
        Ok(Self {
            region: region.to_string(),
            limiter: RateLimiter::direct(Quota::per_second(rate)),
            cache: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(settings.cache_ttl)
                .build(),
            settings,
            client,
            thresholds,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{}", self.settings.base_url.trim_end_matches('/'), path)
    }

    /// Waits for the region's rate limit, but never longer than a request may take.
    async fn permit(&self) -> Result<(), MpiError> {
        tokio::time::timeout(self.settings.timeout, self.limiter.until_ready())
            .await
            .map_err(|_| {
                MpiError::Unavailable(format!("region {} MPI rate limit reached", self.region))
            })
    }

    fn unavailable(&self, what: &str, e: impl std::fmt::Display) -> MpiError {
        MpiError::Unavailable(format!("region {} {what}: {e}", self.region))
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<(u16, Value), MpiError> {
        self.permit().await?;
        let res = request
            .header("accept", "application/fhir+json")
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    self.unavailable(what, "timed out")
                } else {
                    self.unavailable(what, "could not be reached")
                }
            })?;
        let status = res.status().as_u16();
        if status == 429 || status >= 500 {
            return Err(self.unavailable(what, format!("answered {status}")));
        }
        let body = res.json::<Value>().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// ITI-83: the person's NHS number from a local identifier. `None` when the identifier is not known.
    pub async fn pix(&self, id: &LocalIdentifier) -> Result<Option<Resolution>, MpiError> {
        let request = self.client.get(self.url("Patient/$ihe-pix")).query(&[
            ("sourceIdentifier", format!("{}|{}", id.system, id.value)),
            ("targetSystem", NHS_NUMBER_SYSTEM.to_string()),
        ]);
        let (status, body) = self.send(request, "PIXm").await?;
        match status {
            200 => {
                let nhs = body["parameter"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| {
                        p["name"] == "targetIdentifier"
                            && p["valueIdentifier"]["system"] == NHS_NUMBER_SYSTEM
                    })
                    .find_map(|p| {
                        p["valueIdentifier"]["value"]
                            .as_str()
                            .and_then(|v| NhsNumber::parse(v).ok())
                    });
                Ok(Some(match nhs {
                    Some(n) => Resolution::matched(Method::Identifier, Some(n.as_str().to_string()), None),
                    None => Resolution {
                        note: Some("the region's MPI knows the identifier but holds no valid NHS number for it".into()),
                        ..Resolution::none(Method::Identifier)
                    },
                }))
            }
            404 => Ok(None),
            _ => Ok(Some(Resolution {
                note: Some(format!(
                    "the region's MPI refused the identifier ({status}): {}",
                    outcome_text(&body)
                )),
                ..Resolution::none(Method::Identifier)
            })),
        }
    }

    /// ITI-119: candidates for demographics, scored by the region's MPI.
    pub async fn pdq(&self, q: &PatientQuery) -> Result<Resolution, MpiError> {
        let Some(d) = &q.demographics else {
            return Ok(Resolution::none(Method::Demographics));
        };
        let mut patient = json!({"resourceType": "Patient"});
        let mut name = json!({});
        if let Some(f) = &d.family_name {
            name["family"] = json!(f.as_str());
        }
        if let Some(g) = &d.given_name {
            name["given"] = json!([g.as_str()]);
        }
        patient["name"] = json!([name]);
        if let Some(b) = d.birth_date {
            patient["birthDate"] = json!(b.to_string());
        }
        if let Some(s) = d.sex {
            patient["gender"] = json!(s.as_str());
        }
        if let Some(p) = &d.postcode {
            patient["address"] = json!([{"postalCode": p.as_str()}]);
        }
        let body = json!({"resourceType": "Parameters", "parameter": [
            {"name": "resource", "resource": patient},
            {"name": "onlyCertainMatches", "valueBoolean": false},
            {"name": "count", "valueInteger": 5},
        ]});
        let request = self
            .client
            .post(self.url("Patient/$match"))
            .header("content-type", "application/fhir+json")
            .json(&body);
        let (status, body) = self.send(request, "PDQm").await?;
        if status != 200 {
            return Ok(Resolution {
                note: Some(format!(
                    "the region's MPI refused the search ({status}): {}",
                    outcome_text(&body)
                )),
                ..Resolution::none(Method::Demographics)
            });
        }
        let mut candidates: Vec<Candidate> = body["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let grade = e["search"]["extension"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|x| x["url"] == MATCH_GRADE)
                    .and_then(|x| x["valueCode"].as_str())
                    .unwrap_or("possible");
                if grade == "certainly-not" {
                    return None;
                }
                let nhs = e["resource"]["identifier"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|i| i["system"] == NHS_NUMBER_SYSTEM)
                    .find_map(|i| i["value"].as_str().and_then(|v| NhsNumber::parse(v).ok()))?;
                let score = e["search"]["score"].as_f64().unwrap_or(0.0).clamp(0.0, 1.0);
                Some(Candidate {
                    person_id: None,
                    nhs_number: Some(nhs.as_str().to_string()),
                    status: MatchStatus::None,
                    score,
                    parts: vec![super::matcher::Part {
                        field: "external_match_grade",
                        agreement: grade_name(grade),
                        weight: score,
                    }],
                })
            })
            .collect();
        candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
        Ok(Resolution::from_candidates(candidates, self.thresholds))
    }
}

fn grade_name(grade: &str) -> &'static str {
    match grade {
        "certain" => "certain",
        "probable" => "probable",
        _ => "possible",
    }
}

/// The human text of an OperationOutcome's first issue.
fn outcome_text(body: &Value) -> String {
    let issue = &body["issue"][0];
    issue["diagnostics"]
        .as_str()
        .or_else(|| issue["details"]["text"].as_str())
        .or_else(|| issue["code"].as_str())
        .unwrap_or("no OperationOutcome")
        .chars()
        .take(200)
        .collect()
}

fn cache_key(q: &PatientQuery) -> String {
    let r = q.record();
    format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
        q.identifier.as_ref().map(|i| (&i.system, &i.value)),
        r.nhs_number,
        r.given_name,
        r.family_name,
        r.birth_date,
        r.sex,
        r.postcode
    )
}

#[async_trait::async_trait]
impl Mpi for ExternalMpi {
    async fn resolve(&self, q: &PatientQuery) -> Result<Resolution, MpiError> {
        let key = cache_key(q);
        if let Some(hit) = self.cache.get(&key) {
            return Ok(hit);
        }
        let mut answer = None;
        if let Some(id) = &q.identifier {
            answer = self.pix(id).await?;
        }
        let resolved = match answer {
            Some(r) if r.status == MatchStatus::Matched || q.demographics.is_none() => r,
            _ if q.demographics.is_some() => self.pdq(q).await?,
            _ => Resolution::none(Method::Identifier),
        };
        self.cache.insert(key, resolved.clone());
        Ok(resolved)
    }
}
