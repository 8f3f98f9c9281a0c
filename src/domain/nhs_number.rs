//! NHS number: ten digits whose tenth is a Modulus 11 check digit.
//! The only way to get an `NhsNumber` is `parse`, so every value in the system is valid;
//! `Debug` never prints the digits, so a stray `{:?}` cannot leak one into a log.

use std::fmt;

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NhsNumber(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NhsNumberError {
    #[error("must be 10 digits (spaces and hyphens allowed between groups)")]
    Format,
    #[error("check digit does not match (Modulus 11)")]
    CheckDigit,
    #[error("is not a valid NHS number (Modulus 11 check value is 10)")]
    CheckValueTen,
}

impl NhsNumber {
    /// Accepts `9434765919`, `943 476 5919` and `943-476-5919`.
    pub fn parse(input: &str) -> Result<Self, NhsNumberError> {
        let trimmed = input.trim();
        let mut digits = [0u8; 10];
        let mut count = 0;
        for c in trimmed.chars() {
            match c {
                '0'..='9' => {
                    if count == 10 {
                        return Err(NhsNumberError::Format);
                    }
                    digits[count] = c as u8 - b'0';
                    count += 1;
                }
                ' ' | '-' => {}
                _ => return Err(NhsNumberError::Format),
            }
        }
        if count != 10 {
            return Err(NhsNumberError::Format);
        }
        let sum: u32 = digits[..9]
            .iter()
            .zip((2..=10).rev())
            .map(|(d, w)| u32::from(*d) * w)
            .sum();
        let check = match 11 - (sum % 11) {
            11 => 0,
            10 => return Err(NhsNumberError::CheckValueTen),
            c => c,
        };
        if u32::from(digits[9]) != check {
            return Err(NhsNumberError::CheckDigit);
        }
        Ok(Self(digits.iter().map(|d| char::from(b'0' + d)).collect()))
    }

    /// The ten digits, for storage and for answers to an authorised caller.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `999 000 0000` to `999 999 9999` is reserved for testing and never issued.
    pub fn is_test_range(&self) -> bool {
        self.0.starts_with("999")
    }

    /// A non-reversible tag for logs and metrics labels when two events must be correlated.
    pub fn redacted(&self) -> String {
        format!("***{}", &self.0[8..])
    }
}

impl fmt::Debug for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NhsNumber(<redacted>)")
    }
}

impl serde::Serialize for NhsNumber {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_valid_number_in_any_common_layout() {
        for input in [
            "9434765919",
            "943 476 5919",
            "943-476-5919",
            " 943 476 5919 ",
        ] {
            assert_eq!(NhsNumber::parse(input).unwrap().as_str(), "9434765919");
        }
    }

    #[test]
    fn rejects_a_wrong_check_digit() {
        assert_eq!(
            NhsNumber::parse("9434765918"),
            Err(NhsNumberError::CheckDigit)
        );
    }

    #[test]
    fn rejects_a_number_whose_check_value_is_ten() {
        // 1*10 + 1*2 = 12; 12 mod 11 = 1; 11 - 1 = 10: no check digit can make this valid.
        for last in 0..=9 {
            let input = format!("100000001{last}");
            assert_eq!(NhsNumber::parse(&input), Err(NhsNumberError::CheckValueTen));
        }
    }

    #[test]
    fn check_value_eleven_means_zero() {
        // 1*10 + 1*4 + 4*2 = 22, a multiple of 11: 11 - 0 = 11, which means a check digit of 0.
        assert_eq!(
            NhsNumber::parse("1000001040").unwrap().as_str(),
            "1000001040"
        );
        assert_eq!(
            NhsNumber::parse("1000001041"),
            Err(NhsNumberError::CheckDigit)
        );
    }

    #[test]
    fn rejects_wrong_length_and_letters() {
        for input in [
            "943476591",
            "94347659190",
            "",
            "943476591X",
            "943.476.5919",
            "９４３４７６５９１９",
        ] {
            assert_eq!(
                NhsNumber::parse(input),
                Err(NhsNumberError::Format),
                "{input}"
            );
        }
    }

    #[test]
    fn test_range_numbers_are_valid_and_recognised() {
        let n = NhsNumber::parse("999 000 0018").unwrap();
        assert_eq!(n.as_str(), "9990000018");
        assert!(n.is_test_range());
        assert!(!NhsNumber::parse("9434765919").unwrap().is_test_range());
    }

    #[test]
    fn debug_never_shows_the_digits() {
        let n = NhsNumber::parse("9434765919").unwrap();
        assert!(!format!("{n:?}").contains("9434765919"));
        assert!(!n.redacted().contains("94347659"));
    }
}
