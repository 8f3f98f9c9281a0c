//! Closed vocabularies of the contract: plan types, setting types, access kinds, organisation kinds.

use serde::{Deserialize, Serialize};

macro_rules! vocabulary {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $code:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $code)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $code),+ }
            }

            pub fn parse(input: &str) -> Result<Self, String> {
                match input.trim() {
                    $($code => Ok($name::$variant),)+
                    _ => Err(format!(
                        "must be one of {}",
                        [$($code),+].join(", ")
                    )),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

vocabulary!(
    /// `CPP` child protection plan, `LAC` looked-after child, `UCPP` unborn child protection plan.
    PlanType { Cpp => "CPP", Lac => "LAC", Ucpp => "UCPP" }
);

impl PlanType {
    /// SNOMED CT concept for the plan type (used by the FHIR facade).
    pub fn snomed(self) -> (&'static str, &'static str) {
        match self {
            PlanType::Cpp => ("342191000000101", "Child protection plan"),
            PlanType::Lac => ("764841000000100", "Looked after child"),
            PlanType::Ucpp => ("818901000000100", "Unborn child protection plan"),
        }
    }
}

vocabulary!(
    /// Where the child was seen. `SARC`, `SEXUAL_HEALTH` and `TOP` are sensitive settings.
    SettingType {
        Ed => "ED",
        Miu => "MIU",
        Utc => "UTC",
        Wic => "WIC",
        OohGp => "OOH_GP",
        Nhs111 => "NHS111",
        Ambulance => "AMBULANCE",
        Maternity => "MATERNITY",
        PaediatricWard => "PAEDIATRIC_WARD",
        Sarc => "SARC",
        SexualHealth => "SEXUAL_HEALTH",
        Top => "TOP",
        Other => "OTHER",
    }
);

impl SettingType {
    pub fn is_sensitive(self) -> bool {
        matches!(
            self,
            SettingType::Sarc | SettingType::SexualHealth | SettingType::Top
        )
    }
}

vocabulary!(
    /// `unscheduled` checks notify the local authority; `scheduled` ones are silent (audited) reads.
    AccessKind { Unscheduled => "unscheduled", Scheduled => "scheduled" }
);

vocabulary!(
    OrgKind {
        LocalAuthority => "local_authority",
        CareSetting => "care_setting",
        MpiSource => "mpi_source",
        Other => "other",
    }
);

vocabulary!(
    PlanStatus { Active => "active", Ended => "ended" }
);

impl PlanStatus {
    /// A plan is in force from registration until the end of its end date.
    pub fn of(end_date: Option<chrono::NaiveDate>, today: chrono::NaiveDate) -> Self {
        match end_date {
            Some(end) if end < today => PlanStatus::Ended,
            _ => PlanStatus::Active,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    #[test]
    fn vocabularies_round_trip_and_name_the_choices() {
        for t in SettingType::ALL {
            assert_eq!(SettingType::parse(t.as_str()), Ok(*t));
        }
        let err = PlanType::parse("CP").unwrap_err();
        assert!(err.contains("CPP, LAC, UCPP"), "{err}");
        assert!(SettingType::Top.is_sensitive() && !SettingType::Ed.is_sensitive());
    }

    #[test]
    fn a_plan_is_active_through_its_end_date() {
        let d = |s| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        assert_eq!(PlanStatus::of(None, d("2026-01-01")), PlanStatus::Active);
        assert_eq!(
            PlanStatus::of(Some(d("2026-01-01")), d("2026-01-01")),
            PlanStatus::Active
        );
        assert_eq!(
            PlanStatus::of(Some(d("2025-12-31")), d("2026-01-01")),
            PlanStatus::Ended
        );
    }
}
