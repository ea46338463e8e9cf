//! croniter-compatible `get_next` for standard 5-field cron expressions.
//!
//! omega|ml computes every scheduled run with `croniter(cron, last_run)
//! .get_next(datetime)` (croniter 7, naive datetimes), and the client and
//! this worker both write the resulting trigger times into the same job
//! documents, so the worker must agree with croniter to the minute. General
//! cron crates differ from croniter in details that matter here (croniter's
//! "is this field a wildcard" rule decides DOM/DOW OR-semantics; `5-5`
//! means the whole field; wrapped ranges with steps), so this module
//! re-implements croniter's expansion rules (`croniter._expand`) and finds
//! the earliest matching minute, which is what croniter's field-by-field
//! search returns.
//!
//! Supported: numbers, `*`, `?` (DOM/DOW), names (`jan`, `mon`), ranges,
//! wrapped ranges (`fri-mon`), steps (`*/5`, `1-30/5`, `10/5`), lists, `l`
//! (last day) in DOM, DOW 7 = Sunday, `@hourly`-style aliases. Rejected with
//! [`CronError::Unsupported`]: seconds/year fields, `#`, `L<n>`, `W`, `H`/`R`
//! hash expressions — none of which omega|ml's `JobSchedule` can produce.

use chrono::{Datelike, Duration, NaiveDate, NaiveDateTime, Timelike};

/// Why an expression cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    /// croniter would reject it (`CroniterBadCronError`).
    #[error("invalid cron expression {expr:?}: {reason}")]
    Invalid {
        /// The expression as given.
        expr: String,
        /// What is wrong.
        reason: String,
    },
    /// Valid for croniter, but outside what this module implements.
    #[error("unsupported cron expression {expr:?}: {reason}")]
    Unsupported {
        /// The expression as given.
        expr: String,
        /// Which feature.
        reason: String,
    },
    /// No matching time within croniter's 50-year search window
    /// (`CroniterBadDateError`), e.g. `0 0 30 2 *`.
    #[error("failed to find next date for {0:?}")]
    NoNextDate(String),
}

const MINUTE: usize = 0;
const HOUR: usize = 1;
const DOM: usize = 2;
const MONTH: usize = 3;
const DOW: usize = 4;
/// croniter's `RANGES` for the five unix fields.
const RANGES: [(u32, u32); 5] = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 6)];
/// croniter's `LEN_MEANS_ALL`: a field listing this many values is `*`.
const LEN_MEANS_ALL: [usize; 5] = [60, 24, 31, 12, 7];
/// croniter's `max_years_between_matches` default.
const MAX_YEARS: i32 = 50;
const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// One expanded field: `None` = wildcard (croniter's `['*']`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Field {
    /// Allowed values, indexed by value (0..=59 at most).
    values: Option<[bool; 60]>,
    /// DOM only: `l`, the last day of the month.
    last: bool,
}

impl Field {
    fn matches(&self, v: u32) -> bool {
        self.values
            .is_none_or(|vals| vals.get(v as usize).copied().unwrap_or(false))
    }
    fn is_wildcard(&self) -> bool {
        self.values.is_none()
    }
}

/// A parsed expression, ready for [`Cron::next_after`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    expr: String,
    fields: [Field; 5],
}

/// Parses `expr` and returns the first time strictly after `base` (at
/// minute resolution, seconds and microseconds of `base` dropped), as
/// `croniter(expr, base).get_next(datetime)` does for a naive `base`.
pub fn next_after(expr: &str, base: NaiveDateTime) -> Result<NaiveDateTime, CronError> {
    Cron::parse(expr)?.next_after(base)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Star,
    Last,
    Num(u32),
}

impl Cron {
    /// Parses an expression the way `croniter._expand` does.
    pub fn parse(expr: &str) -> Result<Cron, CronError> {
        let invalid = |reason: String| CronError::Invalid {
            expr: expr.to_owned(),
            reason,
        };
        let unsupported = |reason: &str| CronError::Unsupported {
            expr: expr.to_owned(),
            reason: reason.to_owned(),
        };
        let lower = expr.to_ascii_lowercase();
        let efl = match lower.as_str() {
            "@midnight" | "@daily" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            "@yearly" | "@annually" => "0 0 1 1 *",
            other => other,
        };
        // croniter splits on ASCII whitespace only (`\S+` with re.ASCII).
        let parts: Vec<&str> = efl
            .split([' ', '\t', '\n', '\r', '\x0b', '\x0c'])
            .filter(|p| !p.is_empty())
            .collect();
        match parts.len() {
            5 => {}
            6 | 7 => return Err(unsupported("seconds/year fields (6 or 7 columns)")),
            _ => {
                return Err(invalid(
                    "Exactly 5, 6 or 7 columns has to be specified for iterator expression.".into(),
                ))
            }
        }
        let mut fields: Vec<Field> = Vec::with_capacity(5);
        for (idx, raw) in parts.iter().enumerate() {
            let mut raw = *raw;
            if raw.contains('?') {
                if raw != "?" {
                    return Err(invalid(
                        "Question mark can not used with other characters".into(),
                    ));
                }
                if idx != DOM && idx != DOW {
                    return Err(invalid(
                        "Question mark can only used in day_of_month or day_of_week".into(),
                    ));
                }
                raw = "*";
            }
            let mut tokens: Vec<Token> = Vec::new();
            for e in raw.split(',') {
                expand_element(idx, e, &mut tokens).map_err(|r| match r {
                    ElemError::Invalid(s) => invalid(s),
                    ElemError::Unsupported(s) => unsupported(s),
                })?;
            }
            tokens.sort_by_key(|t| match t {
                Token::Star => (0, 0),
                Token::Num(n) => (1, *n),
                Token::Last => (2, 0),
            });
            tokens.dedup();
            let mut wildcard = tokens.first() == Some(&Token::Star);
            if tokens.len() == LEN_MEANS_ALL[idx] {
                // croniter: a full list is '*' unless it is DOM/DOW and the
                // other day field has no '*' in its text (keeps OR-semantics).
                let keep = (idx == DOM && !parts[DOW].contains('*'))
                    || (idx == DOW && !parts[DOM].contains('*'));
                if !keep {
                    wildcard = true;
                }
            }
            let field = if wildcard {
                Field {
                    values: None,
                    last: false,
                }
            } else {
                let mut values = [false; 60];
                let mut last = false;
                for t in &tokens {
                    match t {
                        Token::Num(n) => {
                            if let Some(slot) = values.get_mut(*n as usize) {
                                *slot = true;
                            }
                        }
                        Token::Last => last = true,
                        Token::Star => {}
                    }
                }
                Field {
                    values: Some(values),
                    last,
                }
            };
            fields.push(field);
        }
        let fields: [Field; 5] = fields
            .try_into()
            .map_err(|_| invalid("internal: field count".into()))?;
        Ok(Cron {
            expr: expr.to_owned(),
            fields,
        })
    }

    fn day_matches(&self, date: NaiveDate) -> bool {
        let dom = &self.fields[DOM];
        let dow = &self.fields[DOW];
        let dom_hit =
            || dom.matches(date.day()) || (dom.last && date.day() == last_day_of_month(date));
        let dow_hit = || dow.matches(date.weekday().num_days_from_sunday());
        if !dom.is_wildcard() && !dow.is_wildcard() {
            // croniter's default day_or=True: union of the two.
            dom_hit() || dow_hit()
        } else {
            dom_hit() && dow_hit()
        }
    }

    /// The first match strictly after `base` (croniter: `base + 1 minute`,
    /// seconds dropped, then the earliest time all fields match), searching
    /// croniter's 50 years.
    pub fn next_after(&self, base: NaiveDateTime) -> Result<NaiveDateTime, CronError> {
        let start = (base + Duration::minutes(1))
            .with_second(0)
            .and_then(|t| t.with_nanosecond(0))
            .ok_or_else(|| CronError::NoNextDate(self.expr.clone()))?;
        let last_year = start.year() + MAX_YEARS;
        let mut date = start.date();
        let mut first = true;
        while date.year() <= last_year {
            if self.fields[MONTH].matches(date.month()) && self.day_matches(date) {
                let (from_h, from_m) = if first {
                    (start.hour(), start.minute())
                } else {
                    (0, 0)
                };
                for h in from_h..24 {
                    if !self.fields[HOUR].matches(h) {
                        continue;
                    }
                    let m0 = if h == from_h { from_m } else { 0 };
                    if let Some(m) = (m0..60).find(|m| self.fields[MINUTE].matches(*m)) {
                        return date
                            .and_hms_opt(h, m, 0)
                            .ok_or_else(|| CronError::NoNextDate(self.expr.clone()));
                    }
                }
            }
            first = false;
            date = match date.succ_opt() {
                Some(d) => d,
                None => break,
            };
        }
        Err(CronError::NoNextDate(self.expr.clone()))
    }
}

fn last_day_of_month(date: NaiveDate) -> u32 {
    let (y, m) = if date.month() == 12 {
        (date.year() + 1, 1)
    } else {
        (date.year(), date.month() + 1)
    };
    NaiveDate::from_ymd_opt(y, m, 1)
        .and_then(|d| d.pred_opt())
        .map_or(31, |d| d.day())
}

enum ElemError {
    Invalid(String),
    Unsupported(&'static str),
}

fn is_int(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// croniter's `_alphaconv`: names per field (`l` only in DOM).
fn alpha(idx: usize, s: &str) -> Result<Token, ElemError> {
    let pos = |names: &[&str]| names.iter().position(|n| *n == s);
    let tok = match idx {
        DOM if s == "l" => Some(Token::Last),
        MONTH => pos(&MONTHS).map(|i| Token::Num(i as u32 + 1)),
        DOW => pos(&DAYS).map(|i| Token::Num(i as u32)),
        _ => None,
    };
    tok.ok_or_else(|| ElemError::Invalid(format!("[{s}] is not acceptable")))
}

/// croniter's `value_alias`: DOW 7 is Sunday (DOM/MONTH 0 stay invalid).
fn alias(idx: usize, v: u32) -> u32 {
    if idx == DOW && v == 7 {
        0
    } else {
        v
    }
}

/// `^([^-]+)-([^-/]+)(/(\d+))?$`
fn step_search(t: &str) -> Option<(&str, &str, Option<&str>)> {
    let (low, rest) = t.split_once('-')?;
    if low.is_empty() {
        return None;
    }
    let (high, step) = match rest.split_once('/') {
        Some((h, s)) => (h, Some(s)),
        None => (rest, None),
    };
    if high.is_empty() || high.contains('-') || high.contains('/') {
        return None;
    }
    if let Some(s) = step {
        if !is_int(s) {
            return None;
        }
    }
    Some((low, high, step))
}

/// Expands one comma-separated element, as croniter's `_expand` loop body.
fn expand_element(idx: usize, e: &str, out: &mut Vec<Token>) -> Result<(), ElemError> {
    let (min, max) = RANGES[idx];
    if e.contains('#') {
        return Err(ElemError::Unsupported("'#' (nth weekday)"));
    }
    if idx == DOW && e.len() > 1 && e.starts_with('l') && is_int(&e[1..]) {
        return Err(ElemError::Unsupported("'L<n>' (last weekday)"));
    }
    if idx == DOM && e.contains('w') && e != "w" {
        let digits = e.trim_start_matches('w').trim_end_matches('w');
        if is_int(digits) {
            return Err(ElemError::Unsupported("'W' (nearest weekday)"));
        }
    }
    if e.starts_with('h') || e.starts_with('r') {
        let rest = &e[1..];
        if rest.is_empty() || rest.starts_with('(') || rest.starts_with('/') {
            return Err(ElemError::Unsupported("'H'/'R' hash expressions"));
        }
    }
    // "*/n" -> "min-max/n"
    let t = match e.strip_prefix("*/") {
        Some(rest) => format!("{min}-{max}/{rest}"),
        None => e.to_owned(),
    };
    let mut start_with_step = false;
    let mut m = step_search(&t).map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.map(str::to_owned)));
    if m.is_none() {
        // "{start}/{step}" -> "{start}-{max}/{step}" (greedy: last '/').
        if let Some(pos) = t.rfind('/') {
            let (a, b) = (&t[..pos], &t[pos + 1..]);
            if !a.is_empty() && !b.is_empty() {
                let t2 = format!("{a}-{max}/{b}");
                m = step_search(&t2)
                    .map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.map(str::to_owned)));
                start_with_step = m.is_some();
            }
        }
    }
    if let Some((low, high, step)) = m {
        let high = if idx == DOM && high == "l" {
            "31".to_owned()
        } else {
            high
        };
        let band = |s: &str| -> Result<u32, ElemError> {
            if is_int(s) {
                s.parse::<u32>()
                    .map_err(|_| ElemError::Invalid(format!("bands '{s}' are not acceptable")))
            } else {
                match alpha(idx, s)? {
                    Token::Num(n) => Ok(n),
                    _ => Err(ElemError::Invalid(format!(
                        "bands '{s}' are not acceptable"
                    ))),
                }
            }
        };
        let step: u32 = match step {
            None => 1,
            Some(s) => s
                .parse()
                .map_err(|_| ElemError::Invalid(format!("step '{s}' is not acceptable")))?,
        };
        if step == 0 {
            return Err(ElemError::Invalid("step '0' is not acceptable".into()));
        }
        let (mut low, mut high) = (alias(idx, band(&low)?), alias(idx, band(&high)?));
        if low.max(high) > max {
            return Err(ElemError::Invalid("out of bands".into()));
        }
        let start_at_field_max = start_with_step && low == high;
        if low == high && !start_with_step {
            (low, high) = (min, max);
        }
        let rng: Vec<u32> = if start_at_field_max {
            vec![low]
        } else if low > high {
            // croniter's wrapped range (e.g. fri-mon, 50-10/15), quirks included.
            let mut rng: Vec<u32> = (low..=max).step_by(step as usize).collect();
            let mut to_skip = 0;
            if let Some(&lastv) = rng.last() {
                let len = (max - min + 1) as usize;
                let already_skipped = (max - lastv) as usize;
                let curpos = (lastv - min) as usize;
                if curpos + step as usize > len && already_skipped < step as usize {
                    to_skip = step as usize - already_skipped;
                }
            }
            let from = min as usize + to_skip;
            if from <= high as usize {
                rng.extend((from as u32..=high).step_by(step as usize));
            }
            rng
        } else {
            (low..=high).step_by(step as usize).collect()
        };
        // croniter re-processes each value as a single element: range check.
        for v in rng {
            if v < min || v > max {
                return Err(ElemError::Invalid("out of range".into()));
            }
            out.push(Token::Num(v));
        }
        return Ok(());
    }
    if t.starts_with('-') {
        return Err(ElemError::Invalid("negative numbers not allowed".into()));
    }
    let tok = if t == "*" {
        Token::Star
    } else if is_int(&t) {
        let v = t
            .parse::<u32>()
            .map_err(|_| ElemError::Invalid("out of range".into()))?;
        Token::Num(alias(idx, v))
    } else {
        alpha(idx, &t)?
    };
    if let Token::Num(v) = tok {
        if v < min || v > max {
            return Err(ElemError::Invalid("out of range".into()));
        }
    }
    out.push(tok);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dt(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").expect("test datetime")
    }

    #[test]
    fn every_minute_is_strictly_after() {
        assert_eq!(
            next_after("* * * * *", dt("2024-01-01 10:00:00")).ok(),
            Some(dt("2024-01-01 10:01:00"))
        );
        assert_eq!(
            next_after("* * * * *", dt("2024-01-01 10:00:30")).ok(),
            Some(dt("2024-01-01 10:01:00"))
        );
    }

    #[test]
    fn dom_dow_or() {
        // 2024-01-02 is a Tuesday; the 15th or any Monday.
        assert_eq!(
            next_after("0 0 15 * mon", dt("2024-01-02 00:00:00")).ok(),
            Some(dt("2024-01-08 00:00:00"))
        );
        // DOM '*' -> DOW only
        assert_eq!(
            next_after("0 0 * * mon", dt("2024-01-02 00:00:00")).ok(),
            Some(dt("2024-01-08 00:00:00"))
        );
    }

    #[test]
    fn impossible_dates_fail() {
        assert!(matches!(
            next_after("0 0 30 2 *", dt("2024-01-02 00:00:00")),
            Err(CronError::NoNextDate(_))
        ));
        assert!(matches!(
            Cron::parse("61 * * * *"),
            Err(CronError::Invalid { .. })
        ));
        assert!(matches!(
            Cron::parse("0 0 * * 1#2"),
            Err(CronError::Unsupported { .. })
        ));
    }
}
