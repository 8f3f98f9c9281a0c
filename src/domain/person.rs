//! A person's demographics. Names and postcodes identify a child, so their `Debug` is redacted.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A given or family name: 1 to 100 characters, no control characters, surrounding spaces trimmed.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct PersonName(String);

impl PersonName {
    pub fn parse(input: &str) -> Result<Self, String> {
        let name = input.trim();
        if name.is_empty() {
            return Err("must not be empty".into());
        }
        if name.chars().count() > 100 {
            return Err("must be at most 100 characters".into());
        }
        if name.chars().any(char::is_control) {
            return Err("must not contain control characters".into());
        }
        Ok(Self(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn initial(&self) -> char {
        self.0.chars().next().unwrap_or('?').to_ascii_uppercase()
    }
}

impl fmt::Debug for PersonName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PersonName(<redacted>)")
    }
}

/// A UK postcode, stored upper-case with one space before the inward code (`B1 1AA`).
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Postcode(String);

impl Postcode {
    pub fn parse(input: &str) -> Result<Self, String> {
        let compact: String = input
            .chars()
            .filter(|c| !c.is_whitespace())
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let bytes = compact.as_bytes();
        let ok = (5..=7).contains(&bytes.len())
            && bytes.iter().all(u8::is_ascii_alphanumeric)
            && bytes[0].is_ascii_alphabetic()
            && {
                let inward = &bytes[bytes.len() - 3..];
                inward[0].is_ascii_digit()
                    && inward[1].is_ascii_alphabetic()
                    && inward[2].is_ascii_alphabetic()
            };
        if !ok {
            return Err("must be a UK postcode such as B1 1AA".into());
        }
        let split = compact.len() - 3;
        Ok(Self(format!("{} {}", &compact[..split], &compact[split..])))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Postcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Postcode(<redacted>)")
    }
}

/// Administrative sex as FHIR codes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sex {
    Male,
    Female,
    Other,
    Unknown,
}

impl Sex {
    pub fn parse(input: &str) -> Result<Self, String> {
        match input.trim().to_ascii_lowercase().as_str() {
            "male" | "m" => Ok(Sex::Male),
            "female" | "f" => Ok(Sex::Female),
            "other" => Ok(Sex::Other),
            "unknown" | "u" => Ok(Sex::Unknown),
            _ => Err("must be one of male, female, other, unknown".into()),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Sex::Male => "male",
            Sex::Female => "female",
            Sex::Other => "other",
            Sex::Unknown => "unknown",
        }
    }
}

/// Demographics as given by a caller; every part is optional because callers often know only some.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Demographics {
    pub given_name: Option<PersonName>,
    pub family_name: Option<PersonName>,
    pub birth_date: Option<NaiveDate>,
    pub sex: Option<Sex>,
    pub postcode: Option<Postcode>,
}

impl fmt::Debug for Demographics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Demographics(<redacted>)")
    }
}

impl Demographics {
    /// Initials such as `J.S.`, the most a notification body may carry of a name.
    pub fn initials(&self) -> Option<String> {
        match (&self.given_name, &self.family_name) {
            (Some(g), Some(f)) => Some(format!("{}.{}.", g.initial(), f.initial())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postcodes_are_normalised() {
        assert_eq!(Postcode::parse("b11aa").unwrap().as_str(), "B1 1AA");
        assert_eq!(Postcode::parse(" SW1A 2aa ").unwrap().as_str(), "SW1A 2AA");
        assert!(Postcode::parse("12345").is_err());
        assert!(Postcode::parse("B1").is_err());
        assert!(Postcode::parse("B1 1A").is_err());
    }

    #[test]
    fn names_are_trimmed_and_bounded_and_never_debug_printed() {
        let n = PersonName::parse("  Amelia ").unwrap();
        assert_eq!(n.as_str(), "Amelia");
        assert!(!format!("{n:?}").contains("Amelia"));
        assert!(PersonName::parse("   ").is_err());
        assert!(PersonName::parse(&"x".repeat(101)).is_err());
        assert!(PersonName::parse("A\u{0}B").is_err());
    }

    #[test]
    fn sex_accepts_fhir_codes_and_letters() {
        assert_eq!(Sex::parse("F"), Ok(Sex::Female));
        assert_eq!(Sex::parse("male"), Ok(Sex::Male));
        assert!(Sex::parse("x").is_err());
    }
}
