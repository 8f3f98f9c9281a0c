//! Domain values that can only be built by parsing: once a handler holds one, it is valid.
//! Nothing here touches the database or HTTP.

mod nhs_number;
mod ods_code;
mod person;
mod plan;

pub use nhs_number::{NhsNumber, NhsNumberError};
pub use ods_code::OdsCode;
pub use person::{Demographics, PersonName, Postcode, Sex};
pub use plan::{AccessKind, OrgKind, PlanStatus, PlanType, SettingType};

use chrono::NaiveDate;

/// Parses an ISO 8601 calendar date (`YYYY-MM-DD`), the only date form the API accepts.
pub fn parse_date(input: &str) -> Result<NaiveDate, String> {
    let input = input.trim();
    if input.len() != 10 {
        return Err("must be a date in the form YYYY-MM-DD".into());
    }
    NaiveDate::parse_from_str(input, "%Y-%m-%d")
        .map_err(|_| "must be a real calendar date in the form YYYY-MM-DD".into())
}

/// A telephone number as people write it: digits with spaces, `+`, `-` and brackets; 6 to 20 digits.
pub fn parse_phone(input: &str) -> Result<String, String> {
    let phone = input.trim();
    let digits = phone.chars().filter(char::is_ascii_digit).count();
    if phone.len() > 32
        || !(6..=20).contains(&digits)
        || !phone
            .chars()
            .all(|c| c.is_ascii_digit() || " +-()".contains(c))
    {
        return Err("must be a telephone number such as 0121 303 1888".into());
    }
    Ok(phone.to_string())
}

/// An email address: one `@`, something either side, no spaces, at most 254 characters. Delivery proves the rest.
pub fn parse_email(input: &str) -> Result<String, String> {
    let email = input.trim();
    let ok = email.len() <= 254
        && !email
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ',' || c == '<' || c == '>')
        && matches!(email.split_once('@'), Some((local, domain)) if !local.is_empty() && domain.contains('.') && !domain.contains('@') && !domain.starts_with('.') && !domain.ends_with('.'));
    if !ok {
        return Err("must be an email address such as safeguarding@example.gov.uk".into());
    }
    Ok(email.to_string())
}

/// A region label: 1 to 16 characters of `[A-Z0-9_]`, upper-cased.
pub fn parse_region(input: &str) -> Result<String, String> {
    let region = input.trim().to_ascii_uppercase();
    if region.is_empty()
        || region.len() > 16
        || !region
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err("must be 1 to 16 characters of A-Z, 0-9 and _".into());
    }
    Ok(region)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_emails_and_regions() {
        assert_eq!(parse_phone(" 0121 303 1888 ").unwrap(), "0121 303 1888");
        assert!(parse_phone("+44 (0)121-303-1888").is_ok());
        assert!(parse_phone("call me").is_err());
        assert!(parse_phone("123").is_err());
        assert!(parse_email("mash@birmingham.gov.uk").is_ok());
        assert!(parse_email("mash@localhost").is_err());
        assert!(parse_email("a b@x.uk").is_err());
        assert!(parse_email("a@b@x.uk").is_err());
        assert_eq!(parse_region("bsol").unwrap(), "BSOL");
        assert!(parse_region("B-SOL").is_err());
    }

    #[test]
    fn dates_must_be_iso_and_real() {
        assert_eq!(parse_date("2024-02-29").unwrap().to_string(), "2024-02-29");
        assert!(parse_date("2023-02-29").is_err());
        assert!(parse_date("29/02/2024").is_err());
        assert!(parse_date("2024-2-9").is_err());
        assert!(parse_date("").is_err());
    }
}
