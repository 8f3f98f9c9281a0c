//! `cpis demo`: a small synthetic data set so that a new user can try every endpoint at once. Three regions,
//! a local authority and an emergency department in each, a regional MPI feed, an admin and an auditor, a few
//! dozen plans of every type for synthetic children (NHS numbers from the never-issued 999 test range), and MPI
//! links for some of them; then the curl commands to paste.

use crate::audit::Actor;
use crate::auth::Role;
use crate::clock::Clock;
use crate::db::Db;
use crate::domain::{Demographics, OdsCode, PersonName, Postcode, Sex};
use crate::error::ApiError;
use crate::mpi::builtin;
use crate::mpi::synthetic::Generator;
use crate::mpi::LocalIdentifier;
use crate::plans::{Contacts, PlanInput};
use chrono::Duration;
use serde_json::json;
use std::io::Write;

struct Org {
    ods: &'static str,
    name: &'static str,
    kind: &'static str,
    region: &'static str,
    phones: Option<(&'static str, &'static str)>,
}

const ORGS: &[Org] = &[
    Org {
        ods: "X26",
        name: "cpis operators",
        kind: "other",
        region: "NATIONAL",
        phones: None,
    },
    Org {
        ods: "IG001",
        name: "Information governance",
        kind: "other",
        region: "NATIONAL",
        phones: None,
    },
    Org {
        ods: "E08000025",
        name: "Birmingham City Council",
        kind: "local_authority",
        region: "BSOL",
        phones: Some(("0121 303 1888", "0121 675 4806")),
    },
    Org {
        ods: "E06000050",
        name: "Cheshire West and Chester Council",
        kind: "local_authority",
        region: "CW",
        phones: Some(("0300 123 7034", "01244 977 277")),
    },
    Org {
        ods: "E10000034",
        name: "Worcestershire County Council",
        kind: "local_authority",
        region: "HW",
        phones: Some(("01905 822 666", "01905 768 020")),
    },
    Org {
        ods: "RXK01",
        name: "Sandwell General Hospital ED",
        kind: "care_setting",
        region: "BSOL",
        phones: None,
    },
    Org {
        ods: "RBT20",
        name: "Leighton Hospital ED",
        kind: "care_setting",
        region: "CW",
        phones: None,
    },
    Org {
        ods: "RWP50",
        name: "Worcestershire Royal Hospital ED",
        kind: "care_setting",
        region: "HW",
        phones: None,
    },
    Org {
        ods: "CWMPI",
        name: "Cheshire and Wirral MPI feed",
        kind: "mpi_source",
        region: "CW",
        phones: None,
    },
];

pub const CW_MRN: &str = "https://cw.example.nhs.uk/Id/mrn";

pub fn run(db: &Db, clock: &dyn Clock, base_url: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let now = clock.now_naive();
    let today = clock.today();
    let actor = Actor {
        org: "cli".into(),
        role: Some("demo".into()),
        ..Default::default()
    };
    let mut keys = std::collections::BTreeMap::new();
    let wanted: [(&str, &str, Role); 9] = [
        ("ADMIN", "X26", Role::Admin),
        ("AUDITOR", "IG001", Role::Auditor),
        ("LA_BSOL", "E08000025", Role::SocialCare),
        ("LA_CW", "E06000050", Role::SocialCare),
        ("LA_HW", "E10000034", Role::SocialCare),
        ("ED_BSOL", "RXK01", Role::CareSetting),
        ("ED_CW", "RBT20", Role::CareSetting),
        ("ED_HW", "RWP50", Role::CareSetting),
        ("FEED_CW", "CWMPI", Role::MpiFeed),
    ];
    let mut generator = Generator::new(2026, today);
    let children = generator.population(48);
    let summary = db.write_blocking(|conn| {
        for o in ORGS {
            let body = json!({
                "ods_code": o.ods, "name": o.name, "kind": o.kind, "region": o.region,
                "office_phone": o.phones.map(|p| p.0), "emergency_duty_phone": o.phones.map(|p| p.1),
                "email": (o.kind == "local_authority").then(|| format!("safeguarding@{}.example.gov.uk", o.ods.to_lowercase())),
            });
            crate::api::store_organisation(conn, now, &actor, crate::api::parse_organisation(body)?)?;
        }
        for (name, org, role) in wanted {
            let (_, secret) = crate::api::create_key(conn, now, &actor, &OdsCode::parse(org).expect("valid"), &[role])?;
            keys.insert(name, secret);
        }
        let authorities = ["E08000025", "E06000050", "E10000034"];
        let mut plans = Vec::new();
        for (i, child) in children.iter().enumerate() {
            let la = authorities[i % 3];
            let kind = ["CPP", "CPP", "LAC", "UCPP"][i % 4];
            let demographics = Demographics {
                given_name: PersonName::parse(&child.given_name).ok(),
                family_name: PersonName::parse(&child.family_name).ok(),
                birth_date: Some(child.birth_date),
                sex: Sex::parse(child.sex).ok(),
                postcode: Postcode::parse(&child.postcode).ok(),
            };
            let input = PlanInput {
                local_reference: format!("DEMO-{:03}", i + 1),
                nhs_number: crate::domain::NhsNumber::parse(&child.nhs_number).expect("synthetic numbers are valid"),
                plan_type: crate::domain::PlanType::parse(kind).expect("valid"),
                start_date: today - Duration::days(30 + i as i64 * 7),
                end_date: (i % 12 == 11).then(|| today - Duration::days(3)),
                delete_date: None,
                expected_delivery_date: (kind == "UCPP").then(|| today + Duration::days(60)),
                child: demographics,
                contacts: Contacts::default(),
            };
            let (row, _) = crate::plans::register(conn, now, &actor, la, &input)?;
            plans.push((row, child.clone()));
            // The Cheshire feed knows some of the children under its own identifiers.
            if i % 3 == 0 {
                let person = builtin::upsert_person(conn, now, Some(&child.nhs_number), &Demographics::default())?;
                let id = LocalIdentifier { system: CW_MRN.into(), value: format!("CW{:06}", 100 + i) };
                builtin::link_identifier(conn, now, "CW", &id, &person)?;
            }
        }
        Ok::<_, ApiError>(plans)
    });
    let plans = summary.map_err(|e| anyhow::anyhow!("{}", e.detail()))?;
    let (first, child) = &plans[0];
    writeln!(out, "Demo data loaded: {} organisations in 3 regions, {} plans (CPP, LAC, UCPP), MPI links for region CW.", ORGS.len(), plans.len())?;
    writeln!(
        out,
        "All NHS numbers are synthetic, from the 999 test range. Keys (shown once):\n"
    )?;
    for (name, key) in &keys {
        writeln!(out, "export {name}={key}")?;
    }
    let b = base_url.trim_end_matches('/');
    writeln!(out, "\nStart the service (cargo run -- serve) and try:\n")?;
    writeln!(out, "# A flag check by NHS number at the Birmingham ED")?;
    writeln!(out, "curl -s {b}/v1/flag-checks -H \"Authorization: Bearer $ED_BSOL\" -H 'Content-Type: application/json' \\\n  -d '{{\"patient\": {{\"nhs_number\": \"{}\"}}, \"setting_type\": \"ED\"}}'\n", first.nhs_number)?;
    writeln!(
        out,
        "# The same child attends the Cheshire ED, known there only by its local identifier"
    )?;
    writeln!(out, "curl -s {b}/v1/attendances -H \"Authorization: Bearer $ED_CW\" -H 'Content-Type: application/json' \\\n  -d '{{\"attendance_id\": \"DEMO-ATT-1\", \"setting_ods\": \"RBT20\", \"setting_type\": \"ED\", \"arrived_at\": \"{}\", \"patient\": {{\"identifier\": {{\"system\": \"{CW_MRN}\", \"value\": \"CW000100\"}}}}}}'\n", chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ"))?;
    writeln!(out, "# ... or by demographics with a typo")?;
    writeln!(out, "curl -s {b}/v1/flag-checks -H \"Authorization: Bearer $ED_HW\" -H 'Content-Type: application/json' \\\n  -d '{{\"patient\": {{\"demographics\": {{\"given_name\": \"{}\", \"family_name\": \"{}x\", \"birth_date\": \"{}\", \"postcode\": \"{}\"}}}}}}'\n", child.given_name, child.family_name, child.birth_date, child.postcode)?;
    writeln!(out, "# The responsible authority's notifications (recorded; configure delivery to have them sent)")?;
    writeln!(
        out,
        "curl -s {b}/v1/notifications -H \"Authorization: Bearer $LA_BSOL\""
    )?;
    writeln!(out, "curl -s -X PUT {b}/v1/organisations/E08000025/delivery -H \"Authorization: Bearer $LA_BSOL\" -H 'Content-Type: application/json' \\\n  -d '{{\"webhook\": {{\"url\": \"https://your-receiver.example.org/cpis\"}}}}'\n")?;
    writeln!(
        out,
        "# FHIR: the child's CareTeams, as NHS England's CP-IS API answers them"
    )?;
    writeln!(out, "curl -s '{b}/fhir/R4/CareTeam?patient:identifier=https://fhir.nhs.uk/Id/nhs-number|{}' -H \"Authorization: Bearer $ED_BSOL\" -H 'IsUnscheduledAccessEvent: false'\n", first.nhs_number)?;
    writeln!(
        out,
        "# Information governance: who looked, and is the trail intact?"
    )?;
    writeln!(out, "curl -s {b}/v1/audit/search -H \"Authorization: Bearer $AUDITOR\" -H 'Content-Type: application/json' -d '{{\"nhs_number\": \"{}\"}}'", first.nhs_number)?;
    writeln!(
        out,
        "curl -s {b}/v1/audit/verify -H \"Authorization: Bearer $AUDITOR\""
    )?;
    Ok(())
}
