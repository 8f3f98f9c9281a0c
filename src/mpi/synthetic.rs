//! Synthetic people for the matching evaluation, the benchmarks and the demo: households of children with
//! realistic English names (frequency-weighted), birth dates, sexes and postcodes, NHS numbers from the
//! never-issued 999 test range, and the errors real records carry (typos, nicknames, swapped names and dates,
//! one-digit-off dates, moves, missing fields). Deterministic for a seed.

use chrono::{Datelike, Duration, NaiveDate};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FAMILY: &[&str] = &[
    "Smith",
    "Jones",
    "Williams",
    "Taylor",
    "Brown",
    "Davies",
    "Evans",
    "Wilson",
    "Thomas",
    "Johnson",
    "Roberts",
    "Robinson",
    "Thompson",
    "Wright",
    "Walker",
    "White",
    "Edwards",
    "Hughes",
    "Green",
    "Hall",
    "Lewis",
    "Harris",
    "Clarke",
    "Patel",
    "Jackson",
    "Wood",
    "Turner",
    "Martin",
    "Cooper",
    "Hill",
    "Ward",
    "Morris",
    "Moore",
    "Clark",
    "Lee",
    "King",
    "Baker",
    "Harrison",
    "Morgan",
    "Allen",
    "James",
    "Scott",
    "Phillips",
    "Watson",
    "Davis",
    "Parker",
    "Price",
    "Bennett",
    "Young",
    "Griffiths",
    "Mitchell",
    "Kelly",
    "Cook",
    "Carter",
    "Richardson",
    "Bailey",
    "Collins",
    "Bell",
    "Shaw",
    "Murphy",
    "Miller",
    "Cox",
    "Richards",
    "Khan",
    "Marshall",
    "Anderson",
    "Simpson",
    "Ellis",
    "Adams",
    "Singh",
    "Begum",
    "Wilkinson",
    "Foster",
    "Chapman",
    "Powell",
    "Webb",
    "Rogers",
    "Gray",
    "Mason",
    "Ali",
    "Hunt",
    "Hussain",
    "Campbell",
    "Matthews",
    "Owen",
    "Palmer",
    "Holmes",
    "Mills",
    "Barnes",
    "Knight",
    "Lloyd",
    "Butler",
    "Russell",
    "Barker",
    "Fisher",
    "Stevens",
    "Jenkins",
    "Murray",
    "Dixon",
    "Harvey",
    "Graham",
    "Pearson",
    "Ahmed",
    "Fletcher",
    "Walsh",
    "Kaur",
    "Gibson",
    "Howard",
    "Andrews",
    "Stewart",
    "Elliott",
    "Reynolds",
    "Saunders",
    "Payne",
    "Fox",
    "Ford",
    "Pearce",
    "Day",
    "Brooks",
    "West",
    "Lawrence",
    "Cole",
    "Atkinson",
    "Bradley",
    "Spencer",
    "Gill",
    "Dawson",
    "Ball",
    "Burton",
    "O'Brien",
    "Watts",
    "Rose",
    "Booth",
    "Perry",
    "Ryan",
    "Grant",
    "Wells",
    "Armstrong",
    "Francis",
    "Rees",
    "Hayes",
    "Hart",
    "Hudson",
    "Newman",
    "Barrett",
    "Webster",
    "Hunter",
    "Gregory",
    "Carr",
    "Lowe",
    "Page",
    "Marsh",
    "Riley",
    "Dunn",
    "Woods",
    "Parsons",
    "Berry",
    "Stone",
    "Reid",
    "Holland",
    "Hawkins",
    "Harding",
    "Porter",
    "Robertson",
    "Newton",
    "Oliver",
    "Reed",
    "Kennedy",
    "Williamson",
    "Bird",
    "Gardner",
    "Shah",
    "Dean",
    "Lane",
    "Cooke",
    "Bates",
    "Henderson",
    "Parry",
    "Burgess",
    "Bishop",
    "Walton",
    "Burns",
    "Nicholson",
    "Shepherd",
    "Ross",
    "Cross",
    "Long",
    "Freeman",
    "Warren",
    "Nicholls",
    "Hamilton",
    "Byrne",
    "Sutton",
    "McDonald",
    "Yates",
    "Hodgson",
    "Robson",
    "Curtis",
    "Hopkins",
    "O'Connor",
    "Harper",
    "Coleman",
    "Watkins",
    "Moss",
    "McCarthy",
    "Chambers",
    "O'Neill",
    "Griffin",
    "Sharp",
    "Hardy",
    "Wheeler",
    "Potter",
    "Osborne",
    "Johnston",
    "Gordon",
    "Doyle",
    "Wallace",
    "George",
    "Jordan",
    "Hutchinson",
    "Rowe",
    "Burke",
    "May",
    "Pritchard",
    "Gilbert",
    "Willis",
    "Higgins",
    "Read",
    "Miah",
    "Hanson",
    "Akhtar",
    "Kowalski",
    "Nowak",
    "Okafor",
    "Mensah",
    "Nguyen",
    "Chen",
    "Wang",
    "Rahman",
    "Islam",
    "Choudhury",
    "Uddin",
    "Iqbal",
    "Mahmood",
    "Sharma",
];

const BOYS: &[&str] = &[
    "Oliver",
    "George",
    "Noah",
    "Arthur",
    "Harry",
    "Leo",
    "Muhammad",
    "Jack",
    "Charlie",
    "Oscar",
    "Jacob",
    "Henry",
    "Thomas",
    "Freddie",
    "Alfie",
    "Theo",
    "William",
    "Theodore",
    "Archie",
    "Joshua",
    "Alexander",
    "James",
    "Isaac",
    "Edward",
    "Lucas",
    "Tommy",
    "Finley",
    "Max",
    "Logan",
    "Ethan",
    "Mohammed",
    "Teddy",
    "Benjamin",
    "Arlo",
    "Joseph",
    "Sebastian",
    "Harrison",
    "Elijah",
    "Adam",
    "Daniel",
    "Samuel",
    "Louie",
    "Mason",
    "Reuben",
    "Albie",
    "Rory",
    "Jude",
    "Hugo",
    "Dylan",
    "Ronnie",
    "Toby",
    "Riley",
    "David",
    "Jaxon",
    "Zachary",
    "Caleb",
    "Michael",
    "Ezra",
    "Frederick",
    "Reggie",
    "Ibrahim",
    "Jayden",
    "Ryan",
    "Callum",
    "Kai",
    "Aaron",
    "Luca",
    "Jenson",
    "Felix",
    "Stanley",
    "Bobby",
    "Matthew",
    "Jesse",
    "Otis",
    "Ollie",
    "Liam",
    "Ali",
    "Nathan",
    "Christopher",
    "Robert",
    "Patrick",
    "Kian",
    "Owen",
];

const GIRLS: &[&str] = &[
    "Olivia",
    "Amelia",
    "Isla",
    "Ava",
    "Ivy",
    "Freya",
    "Lily",
    "Florence",
    "Mia",
    "Willow",
    "Rosie",
    "Sophia",
    "Isabella",
    "Grace",
    "Daisy",
    "Sienna",
    "Poppy",
    "Elsie",
    "Emily",
    "Ella",
    "Evelyn",
    "Phoebe",
    "Sofia",
    "Evie",
    "Charlotte",
    "Harper",
    "Millie",
    "Matilda",
    "Maya",
    "Sophie",
    "Alice",
    "Emilia",
    "Isabelle",
    "Ruby",
    "Luna",
    "Maisie",
    "Aria",
    "Penelope",
    "Mila",
    "Bonnie",
    "Eva",
    "Hallie",
    "Eliza",
    "Ada",
    "Violet",
    "Esme",
    "Arabella",
    "Imogen",
    "Jessica",
    "Delilah",
    "Thea",
    "Layla",
    "Rose",
    "Iris",
    "Lottie",
    "Ayla",
    "Margot",
    "Ellie",
    "Hannah",
    "Zara",
    "Aisha",
    "Maryam",
    "Fatima",
    "Chloe",
    "Lucy",
    "Katie",
    "Megan",
    "Holly",
    "Amber",
    "Leah",
    "Erin",
    "Abigail",
    "Elizabeth",
    "Rebecca",
    "Victoria",
    "Samantha",
    "Jennifer",
    "Catherine",
    "Eleanor",
    "Nadia",
    "Amira",
    "Zoe",
];

const AREAS: &[&str] = &[
    "B", "M", "L", "LS", "S", "CV", "WA", "CH", "CW", "ST", "WS", "WV", "DY", "SK", "BL", "OL",
    "WN", "PR", "NG", "LE",
];

const INWARD_LETTERS: &[u8] = b"ABDEFGHJLNPQRSTUWXYZ";

/// A synthetic person as registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    pub nhs_number: String,
    pub given_name: String,
    pub family_name: String,
    pub birth_date: NaiveDate,
    pub sex: &'static str,
    pub postcode: String,
}

impl Person {
    /// The person as the built-in MPI stores them (blocking keys are computed on insert).
    pub fn person_row(&self, now: chrono::NaiveDateTime) -> super::builtin::PersonRow {
        super::builtin::PersonRow {
            id: uuid::Uuid::new_v4().to_string(),
            nhs_number: Some(self.nhs_number.clone()),
            given_name: Some(self.given_name.clone()),
            family_name: Some(self.family_name.clone()),
            birth_date: Some(self.birth_date.into()),
            sex: Some(self.sex.to_string()),
            postcode: Some(self.postcode.clone()),
            name_key: None,
            postcode_key: None,
            created_at: now.into(),
            updated_at: now.into(),
        }
    }
}

/// A description of someone, as a care setting might send it, with the errors it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    pub birth_date: Option<NaiveDate>,
    pub sex: Option<&'static str>,
    pub postcode: Option<String>,
    pub errors: Vec<&'static str>,
}

/// Valid NHS numbers in order: first the never-issued test range 999 000 0000 to 999 999 9999 (about 909,000
/// numbers), then 990 000 0000 upwards, a range not issued in England, for data sets larger than that.
#[derive(Debug, Clone, Default)]
pub struct NhsNumbers {
    stem: u64,
}

impl Iterator for NhsNumbers {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            let k = self.stem;
            self.stem += 1;
            let stem = if k < 1_000_000 {
                999_000_000 + k
            } else {
                990_000_000 + (k - 1_000_000)
            };
            if stem >= 999_000_000 && k >= 1_000_000 {
                return None;
            }
            let digits = format!("{stem:09}");
            let sum: u32 = digits
                .bytes()
                .zip((2..=10).rev())
                .map(|(d, w)| u32::from(d - b'0') * w)
                .sum();
            match 11 - sum % 11 {
                10 => continue,
                11 => return Some(format!("{digits}0")),
                c => return Some(format!("{digits}{c}")),
            }
        }
    }
}

/// Parents do not give two children names that start alike, sound alike or are forms of one name (Freddie and
/// Frederick, Ella and Ellie, Charlotte and Lottie).
fn similar_names(a: &str, b: &str) -> bool {
    use rphonetic::Encoder;
    let (na, nb) = (
        super::matcher::normalise_name(a),
        super::matcher::normalise_name(b),
    );
    let dm = rphonetic::DoubleMetaphone::default();
    a.get(..2) == b.get(..2)
        || super::nicknames::root(&na) == super::nicknames::root(&nb)
        || dm.encode(&na) == dm.encode(&nb)
}

pub struct Generator {
    rng: StdRng,
    today: NaiveDate,
    nhs_numbers: NhsNumbers,
    family_weights: Vec<f64>,
}

impl Generator {
    pub fn new(seed: u64, today: NaiveDate) -> Self {
        let family_weights = (1..=FAMILY.len())
            .map(|rank| 1.0 / (rank as f64).powf(0.8))
            .collect();
        Self {
            rng: StdRng::seed_from_u64(seed),
            today,
            nhs_numbers: NhsNumbers::default(),
            family_weights,
        }
    }

    fn weighted_family(&mut self) -> &'static str {
        let total: f64 = self.family_weights.iter().sum();
        let mut pick = self.rng.random_range(0.0..total);
        for (i, w) in self.family_weights.iter().enumerate() {
            if pick < *w {
                return FAMILY[i];
            }
            pick -= w;
        }
        FAMILY[FAMILY.len() - 1]
    }

    fn postcode(&mut self) -> String {
        let area = AREAS[self.rng.random_range(0..AREAS.len())];
        let district = self.rng.random_range(1..=30);
        let sector = self.rng.random_range(0..=9);
        let a = INWARD_LETTERS[self.rng.random_range(0..INWARD_LETTERS.len())] as char;
        let b = INWARD_LETTERS[self.rng.random_range(0..INWARD_LETTERS.len())] as char;
        format!("{area}{district} {sector}{a}{b}")
    }

    fn birth_date(&mut self) -> NaiveDate {
        self.today - Duration::days(self.rng.random_range(0..18 * 365))
    }

    fn nhs(&mut self) -> String {
        self.nhs_numbers
            .next()
            .expect("about 9.9 million synthetic NHS numbers are available")
    }

    fn child(&mut self, family: &str, postcode: &str, birth_date: NaiveDate) -> Person {
        let sex = if self.rng.random_bool(0.5) {
            "male"
        } else {
            "female"
        };
        let names = if sex == "male" { BOYS } else { GIRLS };
        Person {
            nhs_number: self.nhs(),
            given_name: names[self.rng.random_range(0..names.len())].to_string(),
            family_name: family.to_string(),
            birth_date,
            sex,
            postcode: postcode.to_string(),
        }
    }

    /// A household: one to four children sharing a family name and a postcode, sometimes twins.
    pub fn household(&mut self) -> Vec<Person> {
        let family = self.weighted_family();
        let postcode = self.postcode();
        let size = [1, 1, 2, 2, 2, 3, 3, 4][self.rng.random_range(0..8)];
        let mut children: Vec<Person> = Vec::with_capacity(size);
        let mut dob = self.birth_date();
        for i in 0..size {
            let twin = i > 0 && self.rng.random_bool(0.04);
            if i > 0 && !twin {
                dob -= Duration::days(self.rng.random_range(300..2500));
                if dob < self.today - Duration::days(18 * 365) {
                    break;
                }
            }
            let mut c = self.child(family, &postcode, dob);
            while children
                .iter()
                .any(|s| similar_names(&s.given_name, &c.given_name))
            {
                c = self.child(family, &postcode, dob);
            }
            children.push(c);
        }
        children
    }

    /// `n` persons in households.
    pub fn population(&mut self, n: usize) -> Vec<Person> {
        let mut people = Vec::with_capacity(n + 4);
        while people.len() < n {
            people.extend(self.household());
        }
        people.truncate(n);
        people
    }

    /// A relative of `p` who is someone else: a sibling (or a twin) at the same address.
    pub fn relative(&mut self, p: &Person) -> Person {
        let twin = self.rng.random_bool(0.3);
        let dob = if twin {
            p.birth_date
        } else {
            p.birth_date - Duration::days(self.rng.random_range(300..2000))
        };
        let mut r = self.child(&p.family_name, &p.postcode, dob);
        while similar_names(&r.given_name, &p.given_name) {
            r = self.child(&p.family_name, &p.postcode, dob);
        }
        r
    }

    fn typo(&mut self, s: &str) -> String {
        let mut chars: Vec<char> = s.chars().collect();
        if chars.len() < 3 {
            return s.to_string();
        }
        let i = self.rng.random_range(1..chars.len() - 1);
        match self.rng.random_range(0..4) {
            0 => chars.swap(i, i + 1),
            1 => {
                chars.remove(i);
            }
            2 => chars.insert(i, chars[i]),
            _ => chars[i] = (b'a' + self.rng.random_range(0..26)) as char,
        }
        chars.into_iter().collect()
    }

    fn nickname(given: &str) -> Option<&'static str> {
        Some(match given {
            "William" => "Will",
            "Alexander" => "Alex",
            "Thomas" => "Tom",
            "Oliver" => "Ollie",
            "Frederick" => "Freddie",
            "Benjamin" => "Ben",
            "Joshua" => "Josh",
            "Samuel" => "Sam",
            "Daniel" => "Danny",
            "Edward" => "Eddie",
            "Matthew" => "Matt",
            "Christopher" => "Chris",
            "Robert" => "Bobby",
            "Jacob" => "Jake",
            "Elizabeth" => "Libby",
            "Isabella" => "Bella",
            "Charlotte" => "Lottie",
            "Jessica" => "Jess",
            "Rebecca" => "Becky",
            "Victoria" => "Tori",
            "Catherine" => "Katie",
            "Eleanor" => "Ellie",
            "Sophia" => "Sophie",
            "Jennifer" => "Jenny",
            "Samantha" => "Sammie",
            _ => return None,
        })
    }

    /// The date with one digit of its day, month or year mistyped, still a real date.
    fn one_digit_off(&mut self, date: NaiveDate) -> NaiveDate {
        let text = date.format("%Y%m%d").to_string();
        for _ in 0..50 {
            let mut digits: Vec<u8> = text.bytes().collect();
            let i = [3, 5, 6, 7][self.rng.random_range(0..4)];
            digits[i] = b'0' + self.rng.random_range(0..10);
            let candidate = String::from_utf8(digits).expect("ascii digits");
            if let Ok(d) = NaiveDate::parse_from_str(&candidate, "%Y%m%d") {
                if d != date && d <= self.today {
                    return d;
                }
            }
        }
        date
    }

    /// `p` as a care setting might describe them, with the errors real records carry.
    pub fn describe(&mut self, p: &Person) -> Description {
        let mut d = Description {
            given_name: Some(p.given_name.clone()),
            family_name: Some(p.family_name.clone()),
            birth_date: Some(p.birth_date),
            sex: Some(p.sex),
            postcode: Some(p.postcode.clone()),
            errors: Vec::new(),
        };
        if self.rng.random_bool(0.10) {
            d.family_name = Some(self.typo(&p.family_name));
            d.errors.push("family_typo");
        }
        if self.rng.random_bool(0.08) {
            d.given_name = Some(self.typo(&p.given_name));
            d.errors.push("given_typo");
        } else if self.rng.random_bool(0.15) {
            if let Some(n) = Self::nickname(&p.given_name) {
                d.given_name = Some(n.to_string());
                d.errors.push("nickname");
            }
        }
        if self.rng.random_bool(0.02) {
            std::mem::swap(&mut d.given_name, &mut d.family_name);
            d.errors.push("names_swapped");
        }
        if self.rng.random_bool(0.02) {
            d.family_name = Some(self.weighted_family().to_string());
            d.errors.push("family_changed");
        }
        if self.rng.random_bool(0.05)
            && p.birth_date.day() <= 12
            && p.birth_date.day() != p.birth_date.month()
        {
            d.birth_date = NaiveDate::from_ymd_opt(
                p.birth_date.year(),
                p.birth_date.day(),
                p.birth_date.month(),
            );
            d.errors.push("dob_swapped");
        } else if self.rng.random_bool(0.03) {
            d.birth_date = Some(self.one_digit_off(p.birth_date));
            d.errors.push("dob_off");
        }
        if self.rng.random_bool(0.10) {
            d.postcode = Some(self.postcode());
            d.errors.push("moved");
        } else if self.rng.random_bool(0.05) {
            let mut parts = p.postcode.split(' ');
            let outward = parts.next().unwrap_or_default().to_string();
            let a = INWARD_LETTERS[self.rng.random_range(0..INWARD_LETTERS.len())] as char;
            d.postcode = Some(format!("{outward} {}{a}A", self.rng.random_range(0..=9)));
            d.errors.push("moved_nearby");
        }
        if self.rng.random_bool(0.10) {
            d.postcode = None;
            d.errors.push("no_postcode");
        }
        if self.rng.random_bool(0.15) {
            d.sex = None;
            d.errors.push("no_sex");
        }
        if self.rng.random_bool(0.03) {
            d.given_name = None;
            d.errors.push("no_given_name");
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_nhs_numbers_are_valid_distinct_and_start_in_the_test_range() {
        let numbers: Vec<String> = NhsNumbers::default().take(5000).collect();
        let mut unique = numbers.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), numbers.len());
        for n in &numbers {
            let parsed = crate::domain::NhsNumber::parse(n).unwrap();
            assert!(parsed.is_test_range(), "{n}");
        }
        let beyond = NhsNumbers::default().nth(1_000_000).unwrap();
        assert!(beyond.starts_with("990"), "{beyond}");
        assert!(crate::domain::NhsNumber::parse(&beyond).is_ok());
    }

    #[test]
    fn the_same_seed_gives_the_same_people() {
        let today = NaiveDate::from_ymd_opt(2026, 11, 25).unwrap();
        let a = Generator::new(7, today).population(200);
        let b = Generator::new(7, today).population(200);
        assert_eq!(a, b);
        assert!(a
            .iter()
            .all(|p| crate::domain::Postcode::parse(&p.postcode).is_ok()));
    }
}
