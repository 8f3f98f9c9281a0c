//! Time as a seam: the service reads the clock through this trait so tests and jobs can fix it.

use chrono::{DateTime, NaiveDate, NaiveDateTime, SubsecRound, Utc};
use std::sync::Mutex;

pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;

    /// Now, at the microsecond precision both databases keep, so a value reads back as it was written.
    fn now_naive(&self) -> NaiveDateTime {
        self.now().trunc_subsecs(6).naive_utc()
    }

    fn today(&self) -> NaiveDate {
        self.now().date_naive()
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that stands still until told to move.
#[derive(Debug)]
pub struct FixedClock(Mutex<DateTime<Utc>>);

impl FixedClock {
    pub fn new(at: DateTime<Utc>) -> Self {
        Self(Mutex::new(at))
    }

    pub fn set(&self, at: DateTime<Utc>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = at;
    }
}

impl Clock for FixedClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The wire format of timestamps: RFC 3339, UTC, microseconds.
pub fn format_timestamp(at: impl Into<NaiveDateTime>) -> String {
    at.into()
        .and_utc()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

#[cfg(test)]
mod tests {
    use super::format_timestamp;
    use chrono::NaiveDate;

    #[test]
    fn timestamps_are_utc_with_six_fraction_digits_whatever_the_value() {
        let day = NaiveDate::from_ymd_opt(2026, 3, 9).unwrap();
        assert_eq!(
            format_timestamp(day.and_hms_micro_opt(7, 5, 3, 42).unwrap()),
            "2026-03-09T07:05:03.000042Z"
        );
        assert_eq!(
            format_timestamp(day.and_hms_opt(23, 59, 59).unwrap()),
            "2026-03-09T23:59:59.000000Z"
        );
    }
}
