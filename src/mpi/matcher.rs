//! Probabilistic demographic matching in the Fellegi-Sunter manner: each field's agreement level adds a weight
//! (log2 of how much likelier that agreement is for the same person than for two different ones), the sum is
//! normalised to 0..1, and every part is reported so a score can be explained. Also the blocking keys that keep
//! a lookup to a small candidate set. Pure functions only; storage is in `builtin`.

use super::nicknames;
use chrono::{Datelike, NaiveDate};
use rphonetic::{DoubleMetaphone, Encoder, Soundex};
use serde::Serialize;
use std::sync::OnceLock;

/// One person's demographics as the matcher sees them (normalising happens here, not at the caller).
#[derive(Clone, Copy, Default)]
pub struct Record<'a> {
    pub nhs_number: Option<&'a str>,
    pub given_name: Option<&'a str>,
    pub family_name: Option<&'a str>,
    pub birth_date: Option<NaiveDate>,
    pub sex: Option<&'a str>,
    pub postcode: Option<&'a str>,
}

/// One field's contribution to a score.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Part {
    pub field: &'static str,
    pub agreement: &'static str,
    pub weight: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scored {
    /// Sum of the parts' weights.
    pub weight: f64,
    /// `weight` over the weight of full agreement on every field, clamped to 0..1.
    pub score: f64,
    pub parts: Vec<Part>,
}

/// The weights. Tuned on the labelled data set of `cpis-mpi-eval` (see README); change them only with it.
pub mod w {
    pub const FAMILY_EXACT: f64 = 8.0;
    pub const FAMILY_CLOSE: f64 = 5.5;
    pub const FAMILY_PARTIAL: f64 = 3.0;
    pub const FAMILY_DISAGREE: f64 = -5.0;
    pub const GIVEN_EXACT: f64 = 7.0;
    pub const GIVEN_NICKNAME: f64 = 5.5;
    pub const GIVEN_CLOSE: f64 = 5.0;
    pub const GIVEN_SOUNDS_ALIKE: f64 = 0.5;
    pub const GIVEN_PARTIAL: f64 = 2.0;
    pub const GIVEN_DISAGREE: f64 = -5.0;
    pub const NAMES_SWAPPED_PENALTY: f64 = -1.0;
    pub const DOB_EXACT: f64 = 10.0;
    pub const DOB_SWAPPED: f64 = 7.0;
    pub const DOB_ONE_DIGIT: f64 = 6.0;
    pub const DOB_DISAGREE: f64 = -10.0;
    pub const POSTCODE_FULL: f64 = 5.0;
    pub const POSTCODE_SECTOR: f64 = 3.0;
    pub const POSTCODE_DISTRICT: f64 = 1.5;
    pub const POSTCODE_DISAGREE: f64 = -1.5;
    pub const SEX_AGREE: f64 = 0.8;
    pub const SEX_DISAGREE: f64 = -4.0;
    pub const NHS_DISAGREE: f64 = -60.0;
    /// Full agreement on every demographic field.
    pub const FULL: f64 = FAMILY_EXACT + GIVEN_EXACT + DOB_EXACT + POSTCODE_FULL + SEX_AGREE;
}

/// Upper-case ASCII letters only: accents folded for common Latin letters, punctuation and spaces dropped
/// ("O'Brien-Smith" becomes "OBRIENSMITH").
pub fn normalise_name(name: &str) -> String {
    name.chars()
        .filter_map(|c| {
            let c = match c {
                'à' | 'á' | 'â' | 'ä' | 'ã' | 'å' | 'À' | 'Á' | 'Â' | 'Ä' | 'Ã' | 'Å' => {
                    'A'
                }
                'ç' | 'Ç' => 'C',
                'è' | 'é' | 'ê' | 'ë' | 'È' | 'É' | 'Ê' | 'Ë' => 'E',
                'ì' | 'í' | 'î' | 'ï' | 'Ì' | 'Í' | 'Î' | 'Ï' => 'I',
                'ñ' | 'Ñ' => 'N',
                'ò' | 'ó' | 'ô' | 'ö' | 'õ' | 'ø' | 'Ò' | 'Ó' | 'Ô' | 'Ö' | 'Õ' | 'Ø' => {
                    'O'
                }
                'ù' | 'ú' | 'û' | 'ü' | 'Ù' | 'Ú' | 'Û' | 'Ü' => 'U',
                'ý' | 'ÿ' | 'Ý' => 'Y',
                c => c,
            };
            c.is_ascii_alphabetic().then(|| c.to_ascii_uppercase())
        })
        .collect()
}

fn tokens(name: &str) -> Vec<String> {
    name.split(|c: char| c.is_whitespace() || c == '-')
        .map(normalise_name)
        .filter(|t| !t.is_empty())
        .collect()
}

fn soundex() -> &'static Soundex {
    static S: OnceLock<Soundex> = OnceLock::new();
    S.get_or_init(Soundex::default)
}

fn metaphone() -> &'static DoubleMetaphone {
    static M: OnceLock<DoubleMetaphone> = OnceLock::new();
    M.get_or_init(DoubleMetaphone::default)
}

fn phonetic_equal(a: &str, b: &str) -> bool {
    let m = metaphone();
    let (ra, rb) = (m.double_metaphone(a), m.double_metaphone(b));
    !ra.primary().is_empty()
        && (ra.primary() == rb.primary()
            || ra.primary() == rb.alternate()
            || ra.alternate() == rb.primary())
}

/// Blocking key for a name pair: Soundex of the family name and of the given name's root (first tokens).
pub fn name_key(given: &str, family: &str) -> Option<String> {
    let g = tokens(given).into_iter().next()?;
    let f = tokens(family).into_iter().next()?;
    let s = soundex();
    Some(format!("{}{}", s.encode(&f), s.encode(nicknames::root(&g))))
}

/// Blocking key for people at one address born in one year.
pub fn postcode_key(postcode: &str, birth_date: NaiveDate) -> String {
    format!("{}|{}", postcode.replace(' ', ""), birth_date.year())
}

/// The day-month swapped date, when it is a different real date.
pub fn swapped(date: NaiveDate) -> Option<NaiveDate> {
    (date.day() != date.month() && date.day() <= 12)
        .then(|| NaiveDate::from_ymd_opt(date.year(), date.day(), date.month()))
        .flatten()
}

enum NameLevel {
    Exact,
    Nickname,
    Close,
    SoundsAlike,
    Partial,
    Disagree,
}

fn compare_names(a: &str, b: &str, given: bool) -> NameLevel {
    let (na, nb) = (normalise_name(a), normalise_name(b));
    if na.is_empty() || nb.is_empty() {
        return NameLevel::Disagree;
    }
    if na == nb {
        return NameLevel::Exact;
    }
    let (ta, tb) = (tokens(a), tokens(b));
    if given && nicknames::root(&ta[0]) == nicknames::root(&tb[0]) {
        return NameLevel::Nickname;
    }
    if strsim::jaro_winkler(&na, &nb) >= 0.93 {
        return NameLevel::Close;
    }
    // Short names that only sound alike (Ella and Ellie, Eliza and Elsie) are as often siblings as typos.
    if phonetic_equal(&na, &nb) {
        return NameLevel::SoundsAlike;
    }
    // Double-barrelled or several given names: one shared token, or an initial against a name.
    let shares_token = ta.iter().any(|t| t.len() > 1 && tb.contains(t));
    let initial = (na.len() == 1 || nb.len() == 1) && na.as_bytes()[0] == nb.as_bytes()[0];
    if shares_token || initial || strsim::jaro_winkler(&na, &nb) >= 0.88 {
        return NameLevel::Partial;
    }
    NameLevel::Disagree
}

fn family_part(level: NameLevel) -> Part {
    let (agreement, weight) = match level {
        NameLevel::Exact => ("exact", w::FAMILY_EXACT),
        NameLevel::Nickname | NameLevel::Close | NameLevel::SoundsAlike => {
            ("similar", w::FAMILY_CLOSE)
        }
        NameLevel::Partial => ("partial", w::FAMILY_PARTIAL),
        NameLevel::Disagree => ("different", w::FAMILY_DISAGREE),
    };
    Part {
        field: "family_name",
        agreement,
        weight,
    }
}

fn given_part(level: NameLevel) -> Part {
    let (agreement, weight) = match level {
        NameLevel::Exact => ("exact", w::GIVEN_EXACT),
        NameLevel::Nickname => ("nickname", w::GIVEN_NICKNAME),
        NameLevel::Close => ("similar", w::GIVEN_CLOSE),
        NameLevel::SoundsAlike => ("sounds_alike", w::GIVEN_SOUNDS_ALIKE),
        NameLevel::Partial => ("partial", w::GIVEN_PARTIAL),
        NameLevel::Disagree => ("different", w::GIVEN_DISAGREE),
    };
    Part {
        field: "given_name",
        agreement,
        weight,
    }
}

fn name_parts(q: &Record, c: &Record) -> Vec<Part> {
    let mut straight = Vec::new();
    if let (Some(a), Some(b)) = (q.family_name, c.family_name) {
        straight.push(family_part(compare_names(a, b, false)));
    }
    if let (Some(a), Some(b)) = (q.given_name, c.given_name) {
        straight.push(given_part(compare_names(a, b, true)));
    }
    // Given and family names entered the wrong way round.
    if let (Some(qg), Some(qf), Some(cg), Some(cf)) =
        (q.given_name, q.family_name, c.given_name, c.family_name)
    {
        let crossed = vec![
            family_part(compare_names(qg, cf, false)),
            given_part(compare_names(qf, cg, true)),
        ];
        let sum = |v: &[Part]| v.iter().map(|p| p.weight).sum::<f64>();
        if sum(&crossed) + w::NAMES_SWAPPED_PENALTY > sum(&straight) {
            let mut parts: Vec<Part> = crossed
                .into_iter()
                .map(|p| Part {
                    agreement: if p.weight > 0.0 {
                        "swapped"
                    } else {
                        p.agreement
                    },
                    ..p
                })
                .collect();
            parts.push(Part {
                field: "names_swapped",
                agreement: "yes",
                weight: w::NAMES_SWAPPED_PENALTY,
            });
            return parts;
        }
    }
    straight
}

fn one_digit_apart(a: NaiveDate, b: NaiveDate) -> bool {
    let (sa, sb) = (
        a.format("%Y%m%d").to_string(),
        b.format("%Y%m%d").to_string(),
    );
    sa.bytes().zip(sb.bytes()).filter(|(x, y)| x != y).count() == 1
}

fn date_part(a: NaiveDate, b: NaiveDate) -> Part {
    let (agreement, weight) = if a == b {
        ("exact", w::DOB_EXACT)
    } else if swapped(a) == Some(b) {
        ("day_month_swapped", w::DOB_SWAPPED)
    } else if one_digit_apart(a, b) {
        ("one_digit_off", w::DOB_ONE_DIGIT)
    } else {
        ("different", w::DOB_DISAGREE)
    };
    Part {
        field: "birth_date",
        agreement,
        weight,
    }
}

/// Outward code, sector (outward + first inward digit) and the whole postcode, from `B1 1AA`.
fn postcode_levels(p: &str) -> (String, String, String) {
    let compact: String = p
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase();
    let split = compact.len().saturating_sub(3);
    let outward = compact[..split].to_string();
    let sector = compact[..(split + 1).min(compact.len())].to_string();
    (outward, sector, compact)
}

fn postcode_part(a: &str, b: &str) -> Part {
    let (oa, sa, fa) = postcode_levels(a);
    let (ob, sb, fb) = postcode_levels(b);
    let (agreement, weight) = if fa == fb {
        ("full", w::POSTCODE_FULL)
    } else if sa == sb {
        ("sector", w::POSTCODE_SECTOR)
    } else if oa == ob {
        ("district", w::POSTCODE_DISTRICT)
    } else {
        ("different", w::POSTCODE_DISAGREE)
    };
    Part {
        field: "postcode",
        agreement,
        weight,
    }
}

/// Scores a candidate against a query; fields missing on either side add nothing.
pub fn score(q: &Record, c: &Record) -> Scored {
    let mut parts = name_parts(q, c);
    if let (Some(a), Some(b)) = (q.birth_date, c.birth_date) {
        parts.push(date_part(a, b));
    }
    if let (Some(a), Some(b)) = (q.postcode, c.postcode) {
        parts.push(postcode_part(a, b));
    }
    if let (Some(a), Some(b)) = (q.sex, c.sex) {
        if a != "unknown" && b != "unknown" {
            let agree = a == b;
            parts.push(Part {
                field: "sex",
                agreement: if agree { "same" } else { "different" },
                weight: if agree { w::SEX_AGREE } else { w::SEX_DISAGREE },
            });
        }
    }
    // Two different NHS numbers are two different people, whatever else agrees.
    if let (Some(a), Some(b)) = (q.nhs_number, c.nhs_number) {
        if a != b {
            parts.push(Part {
                field: "nhs_number",
                agreement: "different",
                weight: w::NHS_DISAGREE,
            });
        }
    }
    let weight: f64 = parts.iter().map(|p| p.weight).sum();
    Scored {
        weight,
        score: (weight / w::FULL).clamp(0.0, 1.0),
        parts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    fn amelia() -> Record<'static> {
        Record {
            nhs_number: None,
            given_name: Some("Amelia"),
            family_name: Some("Smith"),
            birth_date: Some(d("2019-03-04")),
            sex: Some("female"),
            postcode: Some("B1 1AA"),
        }
    }

    #[test]
    fn full_agreement_scores_one_and_lists_every_field() {
        let s = score(&amelia(), &amelia());
        assert_eq!(s.score, 1.0);
        let fields: Vec<_> = s.parts.iter().map(|p| p.field).collect();
        assert_eq!(
            fields,
            ["family_name", "given_name", "birth_date", "postcode", "sex"]
        );
    }

    #[test]
    fn typos_swapped_dates_nicknames_and_swapped_names_still_score_high() {
        let typo = Record {
            family_name: Some("Smtih"),
            birth_date: Some(d("2019-04-03")),
            ..amelia()
        };
        let s = score(&typo, &amelia());
        assert!(s.score > 0.75, "{s:?}");
        assert!(s.parts.iter().any(|p| p.agreement == "day_month_swapped"));

        let nick = Record {
            given_name: Some("Bill"),
            ..amelia()
        };
        let william = Record {
            given_name: Some("William"),
            sex: Some("male"),
            ..amelia()
        };
        let s = score(
            &Record {
                sex: Some("male"),
                ..nick
            },
            &william,
        );
        assert!(s.parts.iter().any(|p| p.agreement == "nickname"), "{s:?}");

        let swapped_names = Record {
            given_name: Some("Smith"),
            family_name: Some("Amelia"),
            ..amelia()
        };
        let s = score(&swapped_names, &amelia());
        assert!(s.parts.iter().any(|p| p.field == "names_swapped"), "{s:?}");
        assert!(s.score > 0.8);

        let one_digit = Record {
            birth_date: Some(d("2019-03-14")),
            ..amelia()
        };
        assert!(score(&one_digit, &amelia())
            .parts
            .iter()
            .any(|p| p.agreement == "one_digit_off"));
    }

    #[test]
    fn a_twin_or_a_namesake_elsewhere_scores_well_below_full_agreement() {
        let twin = Record {
            given_name: Some("Olivia"),
            ..amelia()
        };
        assert!(score(&twin, &amelia()).score < 0.7);
        let namesake = Record {
            birth_date: Some(d("2018-11-21")),
            postcode: Some("M1 2AB"),
            ..amelia()
        };
        assert!(score(&namesake, &amelia()).score < 0.3);
        let other_nhs = Record {
            nhs_number: Some("9434765919"),
            ..amelia()
        };
        let with_nhs = Record {
            nhs_number: Some("9990000018"),
            ..amelia()
        };
        assert_eq!(score(&other_nhs, &with_nhs).score, 0.0);
    }

    #[test]
    fn postcode_agreement_has_levels() {
        assert_eq!(postcode_part("B1 1AA", "b11aa").agreement, "full");
        assert_eq!(postcode_part("B1 1AA", "B1 1ZZ").agreement, "sector");
        assert_eq!(postcode_part("B1 1AA", "B1 2AA").agreement, "district");
        assert_eq!(postcode_part("B1 1AA", "B2 1AA").agreement, "different");
    }

    #[test]
    fn blocking_keys_survive_common_errors() {
        assert_eq!(name_key("Bill", "Smith"), name_key("William", "Smyth"));
        assert_eq!(swapped(d("2019-03-04")), Some(d("2019-04-03")));
        assert_eq!(swapped(d("2019-03-03")), None);
        assert_eq!(swapped(d("2019-03-24")), None);
        assert_eq!(postcode_key("B1 1AA", d("2019-03-04")), "B11AA|2019");
        assert_eq!(normalise_name("O'Brien-Smith"), "OBRIENSMITH");
        assert_eq!(normalise_name("Zoë"), "ZOE");
    }
}
