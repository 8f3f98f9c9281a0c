//! Timestamps and dates as the row types hold them: [`Stamp`] and [`Day`], chrono's `NaiveDateTime` and
//! `NaiveDate` with the schema's `Timestamp` and `Date` columns.
//!
//! On PostgreSQL they convert exactly as diesel converts chrono's types. On SQLite, where both are text, diesel
//! formats and parses each chrono value through a `strftime` pattern that chrono parses again on every call:
//! about 4.5% of the writer under attendances, 6.4% of a bulk import and 4% of an HTTP worker under flag checks
//! (BENCHMARKS.md, change 36). These types write and read directly the text diesel writes for a real-world value
//! (`YYYY-MM-DD HH:MM:SS` with no fraction or 3, 6 or 9 digits of one, and `YYYY-MM-DD`), byte for byte, so
//! stored rows, their order and existing databases are unchanged. Anything else (a year outside 0 to 9999, a
//! leap second, other text diesel accepts, such as a `T` or a zone) goes through diesel's own conversion.

use super::MultiBackend;
use chrono::{Datelike, NaiveDate, NaiveDateTime, NaiveTime, Timelike};
use diesel::backend::Backend;
use diesel::deserialize::{self, FromSql};
use diesel::pg::Pg;
use diesel::serialize::{self, IsNull, Output, ToSql};
use diesel::sql_types::{Date, Timestamp};
use diesel::sqlite::Sqlite;

/// Appends `n`, zero-padded to `width` digits (it has no more). A digit loop: `write!` with a width and a
/// fill cost about 1,300 instructions per timestamp under a bulk import, ten times this.
fn push_digits(out: &mut String, mut n: u32, width: usize) {
    let mut buf = [b'0'; 9];
    for slot in buf[..width].iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend(buf[..width].iter().map(|&b| char::from(b)));
}

/// Appends `YYYY-MM-DD`, for a year from 0 to 9999.
fn push_date(out: &mut String, d: NaiveDate) {
    push_digits(out, d.year() as u32, 4);
    out.push('-');
    push_digits(out, d.month(), 2);
    out.push('-');
    push_digits(out, d.day(), 2);
}

/// `d` as diesel writes it on SQLite (`%F`), for years 0 to 9999; `None` otherwise.
pub fn format_day(d: NaiveDate) -> Option<String> {
    (0..=9999).contains(&d.year()).then(|| {
        let mut out = String::with_capacity(10);
        push_date(&mut out, d);
        out
    })
}

/// `t` as diesel writes it on SQLite (`%F %T%.f`: no fraction when it is zero, else 3, 6 or 9 digits, the
/// fewest that hold it), for years 0 to 9999 outside a leap second; `None` otherwise.
pub fn format_stamp(t: &NaiveDateTime) -> Option<String> {
    let nanos = t.nanosecond();
    if nanos >= 1_000_000_000 || !(0..=9999).contains(&t.year()) {
        return None;
    }
    let mut out = String::with_capacity(29);
    push_date(&mut out, t.date());
    for (separator, n) in [(' ', t.hour()), (':', t.minute()), (':', t.second())] {
        out.push(separator);
        push_digits(&mut out, n, 2);
    }
    let (fraction, width) = match nanos {
        0 => return Some(out),
        n if n % 1_000_000 == 0 => (n / 1_000_000, 3),
        n if n % 1_000 == 0 => (n / 1_000, 6),
        n => (n, 9),
    };
    out.push('.');
    push_digits(&mut out, fraction, width);
    Some(out)
}

/// The number in `b`, all ASCII digits, or `None`.
fn digits(b: &[u8]) -> Option<u32> {
    b.iter().try_fold(0u32, |n, &c| {
        c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
    })
}

fn parse_date(b: &[u8]) -> Option<NaiveDate> {
    match b {
        [y @ .., b'-', m1, m2, b'-', d1, d2] if y.len() == 4 => NaiveDate::from_ymd_opt(
            digits(y)? as i32,
            digits(&[*m1, *m2])?,
            digits(&[*d1, *d2])?,
        ),
        _ => None,
    }
}

/// `YYYY-MM-DD`, as [`format_day`] writes it; `None` for anything else.
pub fn parse_day(s: &str) -> Option<NaiveDate> {
    let b = s.as_bytes();
    (b.len() == 10).then(|| parse_date(b))?
}

/// `YYYY-MM-DD HH:MM:SS` with an optional fraction of 1 to 9 digits, as [`format_stamp`] writes it; `None` for
/// anything else.
pub fn parse_stamp(s: &str) -> Option<NaiveDateTime> {
    let b = s.as_bytes();
    if b.len() < 19 || b[10] != b' ' {
        return None;
    }
    let date = parse_date(&b[..10])?;
    let (clock, fraction) = b[11..].split_at(8);
    let [h1, h2, b':', m1, m2, b':', s1, s2] = clock else {
        return None;
    };
    let nanos = match fraction {
        [] => 0,
        [b'.', f @ ..] if (1..=9).contains(&f.len()) => digits(f)? * 10u32.pow(9 - f.len() as u32),
        _ => return None,
    };
    let time = NaiveTime::from_hms_nano_opt(
        digits(&[*h1, *h2])?,
        digits(&[*m1, *m2])?,
        digits(&[*s1, *s2])?,
        nanos,
    )?;
    Some(date.and_time(time))
}

/// One of these types: `$chrono` in a newtype for column type `$sql`, converted to and from `$chrono`, and its
/// conversions on each backend.
macro_rules! column_value {
    ($(#[$doc:meta])* $ty:ident($chrono:ty): $sql:ident, $format:expr, $parse:expr) => {
        $(#[$doc])*
        #[derive(
            Debug,
            Clone,
            Copy,
            PartialEq,
            Eq,
            PartialOrd,
            Ord,
            Hash,
            diesel::AsExpression,
            diesel::FromSqlRow,
            serde::Serialize,
        )]
        #[serde(transparent)]
        #[diesel(sql_type = $sql)]
        pub struct $ty(pub $chrono);

        impl From<$chrono> for $ty {
            fn from(v: $chrono) -> Self {
                $ty(v)
            }
        }

        impl From<$ty> for $chrono {
            fn from(v: $ty) -> Self {
                v.0
            }
        }

        impl std::ops::Deref for $ty {
            type Target = $chrono;
            fn deref(&self) -> &$chrono {
                &self.0
            }
        }

        impl PartialEq<$chrono> for $ty {
            fn eq(&self, other: &$chrono) -> bool {
                self.0 == *other
            }
        }

        impl PartialOrd<$chrono> for $ty {
            fn partial_cmp(&self, other: &$chrono) -> Option<std::cmp::Ordering> {
                self.0.partial_cmp(other)
            }
        }

        impl ToSql<$sql, Pg> for $ty {
            fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
                ToSql::<$sql, Pg>::to_sql(&self.0, out)
            }
        }

        impl FromSql<$sql, Pg> for $ty {
            fn from_sql(bytes: <Pg as Backend>::RawValue<'_>) -> deserialize::Result<Self> {
                FromSql::<$sql, Pg>::from_sql(bytes).map($ty)
            }
        }

        impl ToSql<$sql, Sqlite> for $ty {
            fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
                match $format(&self.0) {
                    Some(text) => {
                        out.set_value(text);
                        Ok(IsNull::No)
                    }
                    None => ToSql::<$sql, Sqlite>::to_sql(&self.0, out),
                }
            }
        }

        impl FromSql<$sql, Sqlite> for $ty {
            fn from_sql(mut value: <Sqlite as Backend>::RawValue<'_>) -> deserialize::Result<Self> {
                match $parse(value.read_text()) {
                    Some(v) => Ok($ty(v)),
                    None => FromSql::<$sql, Sqlite>::from_sql(value).map($ty),
                }
            }
        }

        impl ToSql<$sql, MultiBackend> for $ty {
            fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, MultiBackend>) -> serialize::Result {
                out.set_value((<$sql>::default(), self));
                Ok(IsNull::No)
            }
        }

        impl FromSql<$sql, MultiBackend> for $ty {
            fn from_sql(
                bytes: <MultiBackend as Backend>::RawValue<'_>,
            ) -> deserialize::Result<Self> {
                bytes.from_sql::<Self, $sql>()
            }
        }
    };
}

column_value!(
    /// A `Timestamp` column's value.
    Stamp(NaiveDateTime): Timestamp,
    format_stamp,
    parse_stamp
);
column_value!(
    /// A `Date` column's value.
    Day(NaiveDate): Date,
    |d: &NaiveDate| format_day(*d),
    parse_day
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::models::AccessRow;
    use crate::db::schema::accesses;
    use diesel::prelude::*;

    const DIESEL_FORMAT: &str = "%F %T%.f";

    fn day(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    /// A spread of timestamps: every kind of fraction (none, milli-, micro-, nanoseconds), both ends of the
    /// four-digit years and ordinary days in between.
    fn spread() -> Vec<NaiveDateTime> {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        };
        let mut all = Vec::new();
        for year in [0, 1, 999, 1970, 2026, 9999] {
            for _ in 0..500 {
                let date = day(year, 1, 1) + chrono::Days::new(next(365));
                let nanos = match next(4) {
                    0 => 0,
                    1 => next(1_000) as u32 * 1_000_000,
                    2 => next(1_000_000) as u32 * 1_000,
                    _ => next(1_000_000_000) as u32,
                };
                let (h, m, s) = (next(24) as u32, next(60) as u32, next(60) as u32);
                all.push(date.and_hms_nano_opt(h, m, s, nanos).unwrap());
            }
        }
        all
    }

    #[test]
    fn timestamps_and_dates_are_written_as_diesel_writes_them() {
        for t in spread() {
            let ours = format_stamp(&t).unwrap();
            assert_eq!(ours, t.format(DIESEL_FORMAT).to_string());
            assert_eq!(format_day(t.date()).unwrap(), t.format("%F").to_string());
        }
        // The three fraction widths, by example.
        let t = day(2026, 11, 26).and_hms_opt(9, 5, 7).unwrap();
        let with = |nanos| format_stamp(&t.with_nanosecond(nanos).unwrap()).unwrap();
        assert_eq!(with(0), "2026-11-26 09:05:07");
        assert_eq!(with(120_000_000), "2026-11-26 09:05:07.120");
        assert_eq!(with(120_300_000), "2026-11-26 09:05:07.120300");
        assert_eq!(with(120_300_001), "2026-11-26 09:05:07.120300001");
    }

    #[test]
    fn values_outside_the_plain_form_are_left_to_diesel() {
        let leap = day(2016, 12, 31)
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap();
        assert_eq!(format_stamp(&leap), None);
        for year in [-1, 10_000] {
            let t = day(year, 6, 1).and_hms_opt(12, 0, 0).unwrap();
            assert_eq!(format_stamp(&t), None);
            assert_eq!(format_day(t.date()), None);
        }
        for text in [
            "2026-11-26T09:05:07",
            "2026-11-26 09:05:07Z",
            "2026-11-26 09:05:07+01:00",
            "2026-11-26 09:05",
            "2026-11-26 09:05:07.",
            "2026-11-26 09:05:07.1234567891",
            "2026-02-30 09:05:07",
            "2026-11-26 24:05:07",
            "2026-11-26 09:05:60",
            "+2026-11-26 09:05:07",
            "2026-11-26 09:0a:07",
            "2026-11-26 09:05:07 ",
            "2461005.5",
            "",
        ] {
            assert_eq!(parse_stamp(text), None, "{text}");
        }
        for text in [
            "2026-02-30",
            "26-11-26",
            "2026-11-26 ",
            "2026/11/26",
            "20261126",
            "",
        ] {
            assert_eq!(parse_day(text), None, "{text}");
        }
    }

    #[test]
    fn what_is_written_reads_back_as_diesel_reads_it() {
        for t in spread() {
            let text = format_stamp(&t).unwrap();
            assert_eq!(parse_stamp(&text), Some(t));
            assert_eq!(parse_day(&format_day(t.date()).unwrap()), Some(t.date()));
        }
        // Fractions of any width from one to nine digits, as chrono reads them.
        for text in [
            "2026-11-26 09:05:07.5",
            "2026-11-26 09:05:07.05",
            "2026-11-26 09:05:07.1234",
        ] {
            let chrono = NaiveDateTime::parse_from_str(text, DIESEL_FORMAT).unwrap();
            assert_eq!(parse_stamp(text), Some(chrono), "{text}");
        }
    }

    #[test]
    fn sqlite_stores_the_same_text_and_reads_back_every_form_diesel_accepts() {
        let mut conn = crate::db::tests::memory_sqlite();
        let base = crate::db::deferred::tests::access("a");
        let times = [
            day(2026, 11, 26)
                .and_hms_micro_opt(9, 5, 7, 120_300)
                .unwrap(),
            day(2026, 11, 26).and_hms_opt(9, 5, 7).unwrap(),
            // Diesel's own conversion, both ways.
            day(10_000, 1, 1).and_hms_opt(0, 0, 0).unwrap(),
        ];
        let rows: Vec<AccessRow> = times
            .iter()
            .enumerate()
            .map(|(i, &t)| AccessRow {
                id: format!("a{i}"),
                at: Stamp(t),
                ..base.clone()
            })
            .collect();
        assert_eq!(crate::db::insert_accesses(&mut conn, &rows).unwrap(), 3);
        let crate::db::DbConnection::Sqlite(c) = &mut conn else {
            unreachable!()
        };
        let stored: Vec<(String, String)> =
            diesel::sql_query("SELECT id, at FROM accesses ORDER BY id")
                .load::<Text2>(c)
                .unwrap()
                .into_iter()
                .map(|r| (r.id, r.at))
                .collect();
        for ((_, text), t) in stored.iter().zip(times) {
            assert_eq!(*text, t.format(DIESEL_FORMAT).to_string());
        }
        // Text that diesel accepts in other forms (a `T`, a zone, a Julian day number) still reads.
        for (id, text) in [
            ("b1", "2026-11-26T09:05:07"),
            ("b2", "2026-11-26 09:05:07Z"),
            ("b3", "2461370.5"),
        ] {
            diesel::sql_query(format!(
                "INSERT INTO accesses (id, nhs_number, at, setting_ods, kind, access) \
                 VALUES ('{id}', '9434765919', '{text}', 'RX1', 'check', 'unscheduled')"
            ))
            .execute(c)
            .unwrap();
        }
        let read: Vec<(String, Stamp)> = accesses::table
            .select((accesses::id, accesses::at))
            .order(accesses::id)
            .load(c)
            .unwrap();
        let nine = day(2026, 11, 26).and_hms_opt(9, 5, 7).unwrap();
        let expected = [
            ("a0", times[0]),
            ("a1", times[1]),
            ("a2", times[2]),
            ("b1", nine),
            ("b2", nine),
            ("b3", day(2026, 11, 26).and_hms_opt(0, 0, 0).unwrap()),
        ];
        assert_eq!(read.len(), expected.len());
        for ((id, at), (want_id, want)) in read.iter().zip(expected) {
            assert_eq!((id.as_str(), at.0), (want_id, want));
        }
    }

    #[derive(diesel::QueryableByName)]
    struct Text2 {
        #[diesel(sql_type = diesel::sql_types::Text)]
        id: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        at: String,
    }
}
