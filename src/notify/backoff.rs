//! When to try a delivery again: the configured schedule (delay before each attempt), each delay stretched or
//! shrunk by up to 20% so that many failures at once do not all retry at the same instant.

use rand::Rng;
use std::time::Duration;

/// The delay before attempt number `attempts_done + 1`, or `None` when the schedule is used up.
pub fn next_delay(schedule: &[Duration], attempts_done: usize, jitter: f64) -> Option<Duration> {
    let base = *schedule.get(attempts_done)?;
    Some(base.mul_f64(1.0 + jitter.clamp(-0.2, 0.2)))
}

/// A jitter factor in -0.2..0.2.
pub fn random_jitter() -> f64 {
    rand::rng().random_range(-0.2..0.2)
}

/// The later of the schedule's delay and a server's `Retry-After`, which is honoured but capped at a day.
pub fn honour_retry_after(delay: Duration, retry_after: Option<Duration>) -> Duration {
    match retry_after {
        Some(r) => delay.max(r.min(Duration::from_secs(86_400))),
        None => delay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_schedule() -> Vec<Duration> {
        [
            "0s", "5s", "5m", "30m", "2h", "5h", "10h", "14h", "20h", "24h",
        ]
        .iter()
        .map(|s| crate::config::parse_duration(s).unwrap())
        .collect()
    }

    #[test]
    fn follows_the_schedule_then_stops() {
        let s = spec_schedule();
        assert_eq!(next_delay(&s, 0, 0.0), Some(Duration::ZERO));
        assert_eq!(next_delay(&s, 1, 0.0), Some(Duration::from_secs(5)));
        assert_eq!(next_delay(&s, 9, 0.0), Some(Duration::from_secs(86_400)));
        assert_eq!(next_delay(&s, 10, 0.0), None);
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        let s = spec_schedule();
        for _ in 0..1000 {
            let d = next_delay(&s, 3, random_jitter()).unwrap();
            assert!(
                d >= Duration::from_secs(1440) && d <= Duration::from_secs(2160),
                "{d:?}"
            );
        }
        assert_eq!(next_delay(&s, 3, 5.0), Some(Duration::from_secs(2160)));
    }

    #[test]
    fn retry_after_can_only_lengthen_the_wait() {
        let five = Duration::from_secs(5);
        assert_eq!(
            honour_retry_after(five, Some(Duration::from_secs(60))),
            Duration::from_secs(60)
        );
        assert_eq!(honour_retry_after(five, Some(Duration::from_secs(1))), five);
        assert_eq!(
            honour_retry_after(five, Some(Duration::from_secs(999_999))),
            Duration::from_secs(86_400)
        );
    }
}
