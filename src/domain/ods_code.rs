//! ODS organisation code: 3 to 10 characters of `[A-Z0-9]`, upper-cased on input.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct OdsCode(String);

impl OdsCode {
    pub fn parse(input: &str) -> Result<Self, String> {
        let code = input.trim().to_ascii_uppercase();
        if !(3..=10).contains(&code.len()) {
            return Err("must be 3 to 10 characters".into());
        }
        if !code
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        {
            return Err("may contain only letters A-Z and digits 0-9".into());
        }
        Ok(Self(code))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OdsCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upper_cases_and_checks_length_and_alphabet() {
        assert_eq!(OdsCode::parse(" rxk01 ").unwrap().as_str(), "RXK01");
        assert_eq!(OdsCode::parse("E08000025").unwrap().as_str(), "E08000025");
        assert!(OdsCode::parse("AB").is_err());
        assert!(OdsCode::parse("ABCDEFGHIJK").is_err());
        assert!(OdsCode::parse("RX-01").is_err());
        assert!(OdsCode::parse("RXÉ01").is_err());
    }
}
