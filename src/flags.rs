//! What a care setting is told about a resolved patient: the flags of a matched person, or for a possible match
//! only the local authorities to contact. Shared by flag checks, attendances and the re-matching job.

use crate::db::models::{Organisation, PlanRow};
use crate::db::DbConnection;
use crate::domain::{PlanStatus, PlanType, SettingType};
use crate::mpi::builtin::PlansFound;
use crate::mpi::{MatchStatus, Resolution};
use crate::plans;
use chrono::NaiveDate;
use diesel::result::Error;
use serde_json::{json, Value};

pub const POSSIBLE_MATCH_ADVICE: &str =
    "Possible match: this patient may be subject to a protection plan. Contact the named local authority to confirm \
     before acting; no plan details are shared on an uncertain match.";

#[derive(Debug, Default)]
pub struct FlagView {
    /// The person is matched and has an active plan that applies here.
    pub hit: bool,
    /// The NHS number the flags belong to (matched), or of the possible candidate (never shown to the caller).
    pub nhs_number: Option<String>,
    pub flags: Vec<Value>,
    /// Active plans that apply, for notifications.
    pub active_plans: Vec<PlanRow>,
    /// Every plan that applies (matched only), with the authorities responsible, for other renderings (FHIR).
    pub plans: Vec<PlanRow>,
    pub authorities: Vec<crate::db::models::Organisation>,
}

/// An unborn child protection plan is held against the mother: it applies to her attendances at a maternity
/// unit or an emergency department. Checks see every plan.
pub fn applies(plan: &PlanRow, setting: Option<SettingType>) -> bool {
    match (PlanType::parse(&plan.plan_type), setting) {
        (Ok(PlanType::Ucpp), Some(s)) => matches!(s, SettingType::Maternity | SettingType::Ed),
        _ => true,
    }
}

/// `setting` is the attendance's setting type, or `None` for a check. `found` are the plans held against the
/// resolution's NHS number when its lookup read them too ([`crate::mpi::builtin::Resolved`]); otherwise they are
/// read here.
pub fn view(
    conn: &mut DbConnection,
    resolution: &Resolution,
    found: Option<PlansFound>,
    today: NaiveDate,
    setting: Option<SettingType>,
) -> Result<FlagView, Error> {
    let Some(nhs) = resolution.nhs_number.clone() else {
        return Ok(FlagView::default());
    };
    let found = match found {
        Some(found) => found,
        None => PlanRow::for_nhs_number(conn, &nhs)?,
    };
    let mut plans = Vec::new();
    let mut orgs: Vec<Organisation> = Vec::new();
    for (plan, org) in found {
        if !applies(&plan, setting) {
            continue;
        }
        if let Some(org) = org.filter(|o| !orgs.iter().any(|k| k.ods_code == o.ods_code)) {
            orgs.push(org);
        }
        plans.push(plan);
    }
    orgs.sort_by(|a, b| a.ods_code.cmp(&b.ods_code));
    let active: Vec<PlanRow> = plans
        .iter()
        .filter(|p| p.status(today) == PlanStatus::Active)
        .cloned()
        .collect();
    let org = |p: &PlanRow| orgs.iter().find(|o| o.ods_code == p.la_ods);
    match resolution.status {
        MatchStatus::Matched => {
            let flags = plans
                .iter()
                .map(|p| {
                    json!({
                        "plan_type": p.plan_type,
                        "status": p.status(today).as_str(),
                        "start_date": p.start_date,
                        "end_date": p.end_date,
                        "expected_delivery_date": p.expected_delivery_date,
                        "responsible": plans::responsible(p, org(p), false),
                    })
                })
                .collect();
            Ok(FlagView {
                hit: !active.is_empty(),
                nhs_number: Some(nhs),
                flags,
                active_plans: active,
                plans,
                authorities: orgs,
            })
        }
        MatchStatus::Possible => {
            let mut seen = Vec::new();
            let flags = active
                .iter()
                .filter(|p| {
                    let new = !seen.contains(&p.la_ods);
                    seen.push(p.la_ods.clone());
                    new
                })
                .map(|p| {
                    let r = plans::responsible(p, org(p), false);
                    json!({"status": "possible_match", "message": POSSIBLE_MATCH_ADVICE, "responsible": r})
                })
                .collect();
            Ok(FlagView {
                hit: false,
                nhs_number: Some(nhs),
                flags,
                active_plans: active,
                plans: Vec::new(),
                authorities: orgs,
            })
        }
        MatchStatus::None => Ok(FlagView::default()),
    }
}

/// The `match` object of an answer.
pub fn match_json(r: &Resolution) -> Value {
    json!({"status": r.status.as_str(), "method": r.method.as_str(), "score": (r.score * 1000.0).round() / 1000.0})
}
