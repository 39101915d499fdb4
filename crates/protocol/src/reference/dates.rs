//! The reference's own calendar: the proleptic Gregorian calendar counted out day by day (in jumps of
//! whole 400-year cycles, 146,097 days, first), and interval arithmetic as `BinaryFunc::Add` documents
//! it: months first, the day clamped to the last of the resulting month, then days, then milliseconds;
//! every result within the years 1 to 9999.

use crate::expr::EvalError;

/// Milliseconds in a day.
pub(crate) const DAY_MS: u64 = 86_400_000;

fn is_leap(year: i64) -> bool {
    year % 400 == 0 || (year % 4 == 0 && year % 100 != 0)
}

fn year_length(year: i64) -> i64 {
    if is_leap(year) { 366 } else { 365 }
}

fn month_length(year: i64, month: i64) -> i64 {
    const LENGTHS: [i64; 12] = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if month == 2 && is_leap(year) { 29 } else { LENGTHS[(month - 1) as usize] }
}

/// `(year, month, day)` of the day `day` (days since 1970-01-01).
pub(crate) fn civil(day: i64) -> (i64, i64, i64) {
    let cycles = day.div_euclid(146_097);
    let mut rest = day.rem_euclid(146_097);
    let mut year = 1970 + 400 * cycles;
    while rest >= year_length(year) {
        rest -= year_length(year);
        year += 1;
    }
    let mut month = 1;
    while rest >= month_length(year, month) {
        rest -= month_length(year, month);
        month += 1;
    }
    (year, month, rest + 1)
}

/// The day (since 1970-01-01) of `(year, month, day)`.
pub(crate) fn day_of(year: i64, month: i64, day: i64) -> i64 {
    let cycles = (year - 1970).div_euclid(400);
    let mut total = cycles * 146_097;
    for y in 1970 + 400 * cycles..year {
        total += year_length(y);
    }
    for m in 1..month {
        total += month_length(year, m);
    }
    total + day - 1
}

/// `start` (milliseconds since 1970-01-01, possibly negative) plus `sign` times the interval.
pub(crate) fn add(start: i64, sign: i64, months: i32, days: i32, ms: i64) -> Result<i64, EvalError> {
    let day_ms = DAY_MS as i64;
    let (first, last) = (day_of(1, 1, 1), day_of(9999, 12, 31));
    let (day, time) = (start.div_euclid(day_ms), start.rem_euclid(day_ms));
    if day < first || day > last {
        return Err(EvalError::DateOutOfRange);
    }
    let (year, month, day_of_month) = civil(day);
    let index = year * 12 + (month - 1) + sign * i64::from(months);
    let (year, month) = (index.div_euclid(12), index.rem_euclid(12) + 1);
    if !(1..=9999).contains(&year) {
        return Err(EvalError::DateOutOfRange);
    }
    let day = day_of(year, month, day_of_month.min(month_length(year, month))) + sign * i64::from(days);
    let result = i128::from(day) * i128::from(day_ms) + i128::from(time) + i128::from(sign) * i128::from(ms);
    let result_day = result.div_euclid(i128::from(day_ms));
    if result_day < i128::from(first) || result_day > i128::from(last) {
        return Err(EvalError::DateOutOfRange);
    }
    Ok(result as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_calendar_counts_days_and_clamps_months() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(-1), (1969, 12, 31));
        assert_eq!(civil(day_of(2000, 2, 29)), (2000, 2, 29));
        assert_eq!(day_of(1998, 12, 1), 10_561);
        let day = |y, m, d| day_of(y, m, d) * DAY_MS as i64;
        assert_eq!(add(day(2001, 1, 31), 1, 1, 0, 0), Ok(day(2001, 2, 28)));
        assert_eq!(add(day(2000, 1, 31), 1, 1, 0, 0), Ok(day(2000, 2, 29)));
        assert_eq!(add(day(1998, 12, 1), -1, 0, 90, 0), Ok(day(1998, 9, 2)));
        assert_eq!(add(day(9999, 12, 1), 1, 1, 0, 0), Err(EvalError::DateOutOfRange));
    }
}
