//! Schedule windows: when a rollout may move devices to the candidate. Pure math over UTC minutes and
//! weekdays, no clock: time comes in as unix milliseconds.
//!
//! A window is a daily range `start..end` of minutes after midnight UTC; `end < start` spans midnight,
//! and such a window belongs to the weekday it *starts* on (Friday 22:00-02:00 is open Friday night until
//! Saturday 02:00, not Saturday night). Weekdays are 0 = Sunday .. 6 = Saturday; none listed means every day.

use crate::proto;

const MINUTES_PER_DAY: i64 = 24 * 60;
const MS_PER_MINUTE: i64 = 60_000;
const MS_PER_DAY: i64 = MINUTES_PER_DAY * MS_PER_MINUTE;
/// Short weekday names, index = weekday number (0 = Sunday).
pub const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// A validated schedule window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    start: u32,
    end: u32,
    /// Bit `d` set: open on weekday `d`. All seven set when the spec lists none.
    days: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WindowError {
    #[error("schedule.{field} {value} is not a minute of the day (0 to 1439; 01:30 is 90)")]
    Minute { field: &'static str, value: u32 },
    #[error("schedule window starts and ends at the same minute ({0}); give a window of at least one minute")]
    Empty(u32),
    #[error("schedule.weekdays has {0}, which is not a weekday (0 = Sunday .. 6 = Saturday)")]
    Weekday(u32),
    #[error("schedule.weekdays lists weekday {0} twice")]
    Duplicate(u32),
}

impl Window {
    /// Checks a wire window: minutes under 1440, start != end, weekdays 0..=6 and unique.
    pub fn new(w: &proto::ScheduleWindow) -> Result<Window, WindowError> {
        for (field, value) in [("start_minute_utc", w.start_minute_utc), ("end_minute_utc", w.end_minute_utc)] {
            if i64::from(value) >= MINUTES_PER_DAY {
                return Err(WindowError::Minute { field, value });
            }
        }
        if w.start_minute_utc == w.end_minute_utc {
            return Err(WindowError::Empty(w.start_minute_utc));
        }
        let mut days = 0u8;
        for &d in &w.weekdays {
            if d > 6 {
                return Err(WindowError::Weekday(d));
            }
            if days & (1 << d) != 0 {
                return Err(WindowError::Duplicate(d));
            }
            days |= 1 << d;
        }
        if days == 0 {
            days = 0x7f;
        }
        Ok(Window { start: w.start_minute_utc, end: w.end_minute_utc, days })
    }

    fn spans_midnight(&self) -> bool {
        self.end < self.start
    }

    fn open_on(&self, weekday: i64) -> bool {
        self.days & (1 << weekday.rem_euclid(7)) != 0
    }

    /// True when the window is open at `at` (unix ms).
    pub fn is_open(&self, at: i64) -> bool {
        let (day, minute) = (at.div_euclid(MS_PER_DAY), at.rem_euclid(MS_PER_DAY) / MS_PER_MINUTE);
        let (start, end) = (i64::from(self.start), i64::from(self.end));
        let weekday = weekday_of_day(day);
        if self.spans_midnight() {
            // Tonight's part belongs to today; the part after midnight to yesterday.
            (minute >= start && self.open_on(weekday)) || (minute < end && self.open_on(weekday - 1))
        } else {
            minute >= start && minute < end && self.open_on(weekday)
        }
    }

    /// When the window is next open: `at` itself when it is open now, else the start of the next opening.
    pub fn next_opening(&self, at: i64) -> i64 {
        if self.is_open(at) {
            return at;
        }
        let today = at.div_euclid(MS_PER_DAY);
        // Some weekday is always set, so an opening comes within a week.
        (today..=today + 7)
            .filter(|day| self.open_on(weekday_of_day(*day)))
            .map(|day| day * MS_PER_DAY + i64::from(self.start) * MS_PER_MINUTE)
            .find(|opening| *opening > at)
            .unwrap_or(at)
    }

    /// For people: `01:00-05:00 UTC` and the weekdays when not every day.
    pub fn describe(&self) -> String {
        let mut out = format!("{}-{} UTC", hhmm(self.start), hhmm(self.end));
        if self.days != 0x7f {
            let days: Vec<&str> = (0..7).filter(|d| self.days & (1 << d) != 0).map(|d| WEEKDAYS[d]).collect();
            out.push_str(&format!(" on {}", days.join(",")));
        }
        out
    }
}

/// 0 = Sunday; 1970-01-01 (day 0) was a Thursday.
fn weekday_of_day(day: i64) -> i64 {
    (day + 4).rem_euclid(7)
}

/// `90` → `01:30`.
pub fn hhmm(minute: u32) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

/// Parses `HH:MM-HH:MM` (UTC) into start and end minutes.
pub fn parse_range(text: &str) -> Result<(u32, u32), String> {
    let bad =
        || format!("window {text:?} must be HH:MM-HH:MM in UTC, e.g. 01:00-05:00 (end before start spans midnight)");
    let (start, end) = text.trim().split_once('-').ok_or_else(bad)?;
    let minute = |t: &str| -> Result<u32, String> {
        let (h, m) = t.trim().split_once(':').ok_or_else(bad)?;
        let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if h > 23 || m > 59 || t.trim().len() != 5 {
            return Err(bad());
        }
        Ok(h * 60 + m)
    };
    Ok((minute(start)?, minute(end)?))
}

/// Parses weekday names (`mon`, `Tuesday`, ...) into numbers, 0 = Sunday.
pub fn parse_weekday(text: &str) -> Result<u32, String> {
    let t = text.trim().to_ascii_lowercase();
    WEEKDAYS
        .iter()
        .position(|d| t.len() >= 3 && (t == *d || full_name(d).starts_with(&t)))
        .map(|d| d as u32)
        .ok_or_else(|| format!("{text:?} is not a weekday; use sun, mon, tue, wed, thu, fri or sat"))
}

fn full_name(short: &str) -> &'static str {
    match short {
        "sun" => "sunday",
        "mon" => "monday",
        "tue" => "tuesday",
        "wed" => "wednesday",
        "thu" => "thursday",
        "fri" => "friday",
        _ => "saturday",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-23 was a Monday; unix ms of that day at `hh:mm` plus `days`.
    fn at(days: i64, hh: i64, mm: i64) -> i64 {
        let monday = 20_780 * MS_PER_DAY;
        monday + days * MS_PER_DAY + (hh * 60 + mm) * MS_PER_MINUTE
    }

    fn window(start: u32, end: u32, weekdays: &[u32]) -> Window {
        Window::new(&proto::ScheduleWindow { start_minute_utc: start, end_minute_utc: end, weekdays: weekdays.into() })
            .expect("valid window")
    }

    #[test]
    fn the_reference_day_is_a_monday() {
        assert_eq!(weekday_of_day(at(0, 0, 0) / MS_PER_DAY), 1);
        assert_eq!(weekday_of_day(0), 4, "1970-01-01 was a Thursday");
    }

    #[test]
    fn a_daytime_window_is_open_from_its_start_to_just_before_its_end() {
        let w = window(60, 300, &[]);
        assert!(!w.is_open(at(0, 0, 59)));
        assert!(w.is_open(at(0, 1, 0)));
        assert!(w.is_open(at(0, 4, 59)));
        assert!(!w.is_open(at(0, 5, 0)));
        assert_eq!(w.next_opening(at(0, 0, 30)), at(0, 1, 0));
        assert_eq!(w.next_opening(at(0, 2, 0)), at(0, 2, 0), "open now");
        assert_eq!(w.next_opening(at(0, 5, 0)), at(1, 1, 0), "tomorrow");
    }

    #[test]
    fn a_window_spanning_midnight_belongs_to_the_day_it_starts_on() {
        // Friday 22:00 to Saturday 02:00 only.
        let w = window(22 * 60, 120, &[5]);
        let friday = 4;
        assert!(w.is_open(at(friday, 22, 0)));
        assert!(w.is_open(at(friday, 23, 59)));
        assert!(w.is_open(at(friday + 1, 0, 0)), "Saturday just after midnight is Friday's window");
        assert!(w.is_open(at(friday + 1, 1, 59)));
        assert!(!w.is_open(at(friday + 1, 2, 0)));
        assert!(!w.is_open(at(friday + 1, 22, 30)), "Saturday night is not open");
        assert!(!w.is_open(at(friday, 1, 0)), "Friday early morning belongs to Thursday, which is not listed");
        assert_eq!(w.next_opening(at(friday + 1, 3, 0)), at(friday + 7, 22, 0), "next Friday");
        assert_eq!(w.next_opening(at(0, 12, 0)), at(friday, 22, 0));
    }

    #[test]
    fn weekday_edges_wrap_from_saturday_to_sunday() {
        // Saturday 23:00 to Sunday 01:00.
        let w = window(23 * 60, 60, &[6]);
        let saturday = 5;
        assert!(w.is_open(at(saturday, 23, 30)));
        assert!(w.is_open(at(saturday + 1, 0, 30)), "Sunday 00:30 is Saturday's window");
        assert!(!w.is_open(at(saturday + 1, 23, 30)), "Sunday night is not");
        // Sunday only, daytime: Monday is closed, next opening is Sunday.
        let w = window(600, 660, &[0]);
        assert!(!w.is_open(at(0, 10, 30)));
        assert!(w.is_open(at(6, 10, 30)));
        assert_eq!(w.next_opening(at(0, 10, 30)), at(6, 10, 0));
    }

    #[test]
    fn bad_windows_are_refused_with_the_field_named() {
        let bad = |start, end, days: &[u32]| {
            Window::new(&proto::ScheduleWindow { start_minute_utc: start, end_minute_utc: end, weekdays: days.into() })
                .expect_err("invalid")
                .to_string()
        };
        assert!(bad(1440, 60, &[]).contains("start_minute_utc 1440"));
        assert!(bad(0, 2000, &[]).contains("end_minute_utc 2000"));
        assert!(bad(60, 60, &[]).contains("same minute"));
        assert!(bad(60, 120, &[7]).contains("7, which is not a weekday"));
        assert!(bad(60, 120, &[1, 1]).contains("twice"));
    }

    #[test]
    fn ranges_and_weekdays_parse_and_bad_text_is_named() {
        assert_eq!(parse_range("01:00-05:00"), Ok((60, 300)));
        assert_eq!(parse_range("22:30-02:00"), Ok((1350, 120)));
        for bad in ["1-5", "01:00", "25:00-01:00", "01:60-02:00", "1:00-05:00", "aa:bb-cc:dd"] {
            assert!(parse_range(bad).expect_err(bad).contains("HH:MM-HH:MM"), "{bad}");
        }
        assert_eq!(parse_weekday("Mon"), Ok(1));
        assert_eq!(parse_weekday("saturday"), Ok(6));
        assert_eq!(parse_weekday("sun"), Ok(0));
        assert!(parse_weekday("mo").is_err());
        assert!(parse_weekday("funday").expect_err("bad").contains("not a weekday"));
        assert_eq!(window(60, 300, &[1, 2]).describe(), "01:00-05:00 UTC on mon,tue");
        assert_eq!(window(60, 300, &[]).describe(), "01:00-05:00 UTC");
    }

    proptest::proptest! {
        #[test]
        fn next_opening_is_open_and_nothing_between_is(start in 0u32..1440, end in 0u32..1440,
            days in proptest::collection::btree_set(0u32..7, 0..7), offset in 0i64..(14 * MS_PER_DAY)) {
            proptest::prop_assume!(start != end);
            let w = window(start, end, &days.into_iter().collect::<Vec<_>>());
            let now = at(0, 0, 0) + offset;
            let next = w.next_opening(now);
            proptest::prop_assert!(next >= now && next - now <= 8 * MS_PER_DAY);
            proptest::prop_assert!(w.is_open(next));
            // Minute by minute up to the opening, the window is closed.
            let mut t = now - now.rem_euclid(MS_PER_MINUTE) + MS_PER_MINUTE;
            while t < next {
                proptest::prop_assert!(!w.is_open(t), "open at {t} before the reported opening {next}");
                t += 7 * MS_PER_MINUTE;
            }
        }
    }
}
