//! The `patient` object shared by flag checks, attendances and MPI diagnostics: an NHS number, a local
//! identifier, demographics, or any mix.

use crate::domain::NhsNumber;
use crate::error::Validator;
use crate::mpi::builtin::can_match;
use crate::mpi::{LocalIdentifier, PatientQuery};
use crate::plans::{parse_child, ChildBody};
use chrono::NaiveDate;
use serde::Deserialize;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatientBody {
    pub nhs_number: Option<String>,
    pub identifier: Option<IdentifierBody>,
    pub demographics: Option<ChildBody>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentifierBody {
    pub system: Option<String>,
    pub value: Option<String>,
}

fn token(max: usize, what: &'static str) -> impl Fn(String) -> Result<String, String> {
    move |s| {
        let t = s.trim();
        if t.is_empty() || t.len() > max || t.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(format!(
                "must be {what}: 1 to {max} characters without spaces"
            ));
        }
        Ok(t.to_string())
    }
}

/// Parses an identifier found at `prefix` (e.g. `patient.identifier`).
pub fn parse_identifier(
    v: &mut Validator,
    prefix: &str,
    body: IdentifierBody,
) -> Option<LocalIdentifier> {
    let system = match body.system {
        None => {
            v.push(&format!("{prefix}.system"), "is required");
            None
        }
        Some(s) => v.check(
            &format!("{prefix}.system"),
            token(200, "a URI naming the identifier's system")(s),
        ),
    };
    let value = match body.value {
        None => {
            v.push(&format!("{prefix}.value"), "is required");
            None
        }
        Some(s) => v.check(&format!("{prefix}.value"), token(100, "the identifier")(s)),
    };
    Some(LocalIdentifier {
        system: system?,
        value: value?,
    })
}

/// Parses the `patient` object; `region` is the asking organisation's.
pub fn parse_patient(
    v: &mut Validator,
    body: Option<PatientBody>,
    today: NaiveDate,
    region: Option<String>,
) -> Option<PatientQuery> {
    let Some(p) = body else {
        v.push("patient", "is required");
        return None;
    };
    if p.nhs_number.is_none() && p.identifier.is_none() && p.demographics.is_none() {
        v.push("patient", "needs nhs_number, identifier or demographics");
        return None;
    }
    let before = v.count();
    let nhs_number = v.optional("patient.nhs_number", p.nhs_number, |s| {
        NhsNumber::parse(&s).map_err(|e| e.to_string())
    });
    let identifier = p
        .identifier
        .and_then(|i| parse_identifier(v, "patient.identifier", i));
    let demographics = p
        .demographics
        .map(|d| parse_child(v, "patient.demographics.", d, today));
    if let Some(d) = &demographics {
        if nhs_number.is_none() && identifier.is_none() && !can_match(d) && v.count() == before {
            v.push(
                "patient.demographics",
                "needs birth_date and a given or family name to match on",
            );
        }
    }
    (v.count() == before).then_some(PatientQuery {
        nhs_number,
        identifier,
        demographics,
        region,
    })
}
