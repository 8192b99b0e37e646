//! Wall-clock helpers: budget periods are UTC calendar days and months.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// (year, month, day) of a day count since 1970-01-01 (Hinnant's civil_from_days).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `YYYY-MM-DD` (UTC) of a unix time in milliseconds.
pub fn day_key(ms: i64) -> String {
    let (y, m, d) = civil(ms.div_euclid(86_400_000));
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM` (UTC) of a unix time in milliseconds.
pub fn month_key(ms: i64) -> String {
    let (y, m, _) = civil(ms.div_euclid(86_400_000));
    format!("{y:04}-{m:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_keys() {
        assert_eq!(day_key(0), "1970-01-01");
        assert_eq!(day_key(951_782_400_000), "2000-02-29");
        assert_eq!(day_key(1_795_910_399_999), "2026-11-28");
        assert_eq!(day_key(1_795_910_400_000), "2026-11-29");
        assert_eq!(month_key(1_798_761_599_999), "2026-12");
        assert_eq!(month_key(1_798_761_600_000), "2027-01");
    }
}
