//! Per-task-name limits set by remote control: `time_limit` (Celery sets
//! `task.soft_time_limit` / `task.time_limit`) and `rate_limit` (Celery sets
//! `task.rate_limit` and rebuilds the consumer's token buckets).
//!
//! Both act on later tasks of that name only. A rate limit is a token bucket
//! of capacity 1 (kombu's `TokenBucket(rate, capacity=1)`, as
//! `Consumer.bucket_for_task` builds it) that a delivery passes *before* it
//! takes a task slot: a rate-limited message waits unacked (it is neither
//! acked early nor lost; at shutdown it goes back to its queue like any
//! message not started), in arrival order, and starts no sooner than the rate
//! allows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::protocol::Value;

/// Why a `rate_limit` value was refused; the text is the reply's `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// Celery: `nok(f'Invalid rate limit string: {exc!r}')` for a ValueError.
    #[error("Invalid rate limit string: {0}")]
    Invalid(String),
    /// An unknown unit (`'5/d'`): Celery's `RATE_MODIFIER_MAP[...]` raises a
    /// KeyError the command does not catch, so kombu answers its repr.
    #[error("{0}")]
    Uncaught(String),
}

/// Celery's `celery.utils.time.rate`: tasks per second from `'100/m'`,
/// `'2/h'`, `'0.5/s'`, `'10'` (per second) or a number; `None`, `''` and 0
/// mean no limit (`Ok(None)`).
pub fn parse_rate(v: &Value) -> Result<Option<f64>, RateError> {
    let per_sec = match v {
        Value::None => return Ok(None),
        Value::Bool(b) => f64::from(u8::from(*b)),
        Value::Int(i) => *i as f64,
        Value::Float(f) => *f,
        Value::Str(s) => {
            if s.is_empty() {
                return Ok(None);
            }
            let (ops, modifier) = s.split_once('/').unwrap_or((s.as_str(), ""));
            let div = match modifier {
                "" | "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                other => {
                    return Err(RateError::Uncaught(format!(
                        "KeyError({})",
                        Value::Str(other.to_owned()).repr()
                    )))
                }
            };
            let n: f64 = ops.trim().parse().map_err(|_| {
                let msg = format!(
                    "could not convert string to float: {}",
                    Value::Str(ops.to_owned()).repr()
                );
                RateError::Invalid(format!("ValueError({})", Value::Str(msg).repr()))
            })?;
            n / div
        }
        other => {
            let msg = format!("unsupported rate limit type {}", other.type_name());
            return Err(RateError::Invalid(format!(
                "TypeError({})",
                Value::Str(msg).repr()
            )));
        }
    };
    // Celery would build a bucket that never fills (negative) or compare
    // against NaN; refuse both instead of stalling the task forever.
    if per_sec.is_nan() || per_sec < 0.0 {
        let msg = format!("rate must be a positive number of tasks, got {per_sec}");
        return Err(RateError::Invalid(format!(
            "ValueError({})",
            Value::Str(msg).repr()
        )));
    }
    Ok((per_sec > 0.0).then_some(per_sec))
}

/// kombu's `TokenBucket` with capacity 1: starts full, refills at
/// `fill_rate` tokens per second.
#[derive(Debug)]
struct Tokens {
    fill_rate: f64,
    tokens: f64,
    at: Instant,
}

impl Tokens {
    const CAPACITY: f64 = 1.0;

    fn refill(&mut self, now: Instant) {
        if self.tokens < Self::CAPACITY {
            let delta = self.fill_rate * now.saturating_duration_since(self.at).as_secs_f64();
            self.tokens = (self.tokens + delta).min(Self::CAPACITY);
        }
        self.at = now;
    }

    /// Takes a token now (`None`) or says how long until one is there.
    fn take(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return None;
        }
        let secs = (1.0 - self.tokens) / self.fill_rate;
        Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
    }
}

/// One task name's bucket. Replaced (and `replaced` fired) when its rate
/// changes, so deliveries waiting on the old rate re-read the new one.
#[derive(Debug)]
struct Bucket {
    /// What the command was given, for `registered` (`rate_limit=10/m`).
    text: String,
    /// Held while a delivery waits for its token: waiters go in turn.
    tokens: tokio::sync::Mutex<Tokens>,
    replaced: CancellationToken,
}

/// `(soft, hard)` time limits in seconds; `None` = the worker's default.
type TimeLimits = (Option<f64>, Option<f64>);

/// Limits set by remote control, by task name.
#[derive(Debug, Default)]
pub struct TaskLimits {
    time: Mutex<HashMap<String, TimeLimits>>,
    rates: Mutex<HashMap<String, Arc<Bucket>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TaskLimits {
    /// `time_limit`: later tasks of `name` get these limits unless their
    /// message carries its own (Celery: `soft_time_limit or task.soft_time_limit`).
    pub fn set_time_limits(&self, name: &str, soft: Option<f64>, hard: Option<f64>) {
        let mut g = lock(&self.time);
        if soft.is_none() && hard.is_none() {
            g.remove(name);
        } else {
            g.insert(name.to_owned(), (soft, hard));
        }
    }

    /// `(soft, hard)` set for `name` by `time_limit`.
    pub fn time_limits(&self, name: &str) -> TimeLimits {
        lock(&self.time).get(name).copied().unwrap_or((None, None))
    }

    /// `rate_limit`: `per_sec` tasks of `name` per second from now on
    /// (`None` removes the limit). `text` is what `registered` shows.
    pub fn set_rate(&self, name: &str, per_sec: Option<f64>, text: &str) {
        let old = {
            let mut g = lock(&self.rates);
            match per_sec {
                Some(rate) => g.insert(
                    name.to_owned(),
                    Arc::new(Bucket {
                        text: text.to_owned(),
                        tokens: tokio::sync::Mutex::new(Tokens {
                            fill_rate: rate,
                            tokens: Tokens::CAPACITY,
                            at: Instant::now(),
                        }),
                        replaced: CancellationToken::new(),
                    }),
                ),
                None => g.remove(name),
            }
        };
        if let Some(old) = old {
            old.replaced.cancel();
        }
    }

    /// The rate limit text set for `name`, if any.
    pub fn rate_text(&self, name: &str) -> Option<String> {
        lock(&self.rates).get(name).map(|b| b.text.clone())
    }

    /// Waits until a task of `name` may start under its rate limit (at
    /// once when it has none) and takes the token. Cancel-safe: dropping
    /// the future takes no token.
    pub async fn wait_for_rate(&self, name: &str) {
        loop {
            let Some(bucket) = lock(&self.rates).get(name).cloned() else {
                return;
            };
            let mut tokens = tokio::select! {
                t = bucket.tokens.lock() => t,
                _ = bucket.replaced.cancelled() => continue,
            };
            loop {
                match tokens.take(Instant::now()) {
                    None => return,
                    Some(wait) => {
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = bucket.replaced.cancelled() => break,
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::Str(x.into())
    }

    #[test]
    fn rates_as_celery_parses_them() {
        assert_eq!(parse_rate(&s("10/s")), Ok(Some(10.0)));
        assert_eq!(parse_rate(&s("10")), Ok(Some(10.0)));
        assert_eq!(parse_rate(&s("30/m")), Ok(Some(0.5)));
        assert_eq!(parse_rate(&s("36/h")), Ok(Some(0.01)));
        assert_eq!(parse_rate(&s("0.5/s")), Ok(Some(0.5)));
        assert_eq!(parse_rate(&Value::Int(5)), Ok(Some(5.0)));
        for off in [s(""), Value::None, Value::Int(0), s("0/m")] {
            assert_eq!(parse_rate(&off), Ok(None), "{off:?}");
        }
        assert_eq!(
            parse_rate(&s("abc/m")),
            Err(RateError::Invalid(
                "ValueError(\"could not convert string to float: 'abc'\")".into()
            ))
        );
        assert_eq!(
            parse_rate(&s("5/d")).map_err(|e| e.to_string()),
            Err("KeyError('d')".into())
        );
        assert_eq!(
            parse_rate(&s("abc")).map_err(|e| e.to_string()),
            Err(
                "Invalid rate limit string: ValueError(\"could not convert string to float: 'abc'\")"
                    .into()
            )
        );
        assert!(parse_rate(&s("-1/s")).is_err());
        assert!(parse_rate(&Value::List(vec![])).is_err());
    }

    #[test]
    fn token_bucket_starts_full_and_refills() {
        let t0 = Instant::now();
        let mut b = Tokens {
            fill_rate: 2.0,
            tokens: 1.0,
            at: t0,
        };
        assert_eq!(b.take(t0), None, "the first token is there");
        let wait = b.take(t0).expect("empty");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
        assert_eq!(b.take(t0 + Duration::from_millis(500)), None);
        assert!(b.take(t0 + Duration::from_millis(600)).is_some());
    }

    #[tokio::test]
    async fn waits_space_starts_and_a_new_rate_applies_to_waiters() {
        let l = Arc::new(TaskLimits::default());
        l.wait_for_rate("t").await; // no limit: at once
        l.set_rate("t", Some(10.0), "10/s");
        assert_eq!(l.rate_text("t").as_deref(), Some("10/s"));
        let t0 = Instant::now();
        l.wait_for_rate("t").await;
        l.wait_for_rate("t").await;
        l.wait_for_rate("t").await;
        assert!(
            t0.elapsed() >= Duration::from_millis(190),
            "{:?}",
            t0.elapsed()
        );
        // A waiter on a slow rate is released when the limit is removed.
        l.set_rate("t", Some(1.0 / 3600.0), "1/h");
        l.wait_for_rate("t").await; // the new bucket's first token
        let l2 = Arc::clone(&l);
        let waiter = tokio::spawn(async move { l2.wait_for_rate("t").await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished());
        l.set_rate("t", None, "");
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("released by the removal")
            .expect("joined");
        assert_eq!(l.rate_text("t"), None);
    }

    #[test]
    fn time_limits_by_name() {
        let l = TaskLimits::default();
        assert_eq!(l.time_limits("a"), (None, None));
        l.set_time_limits("a", Some(1.0), Some(2.0));
        assert_eq!(l.time_limits("a"), (Some(1.0), Some(2.0)));
        assert_eq!(l.time_limits("b"), (None, None));
        l.set_time_limits("a", None, None);
        assert_eq!(l.time_limits("a"), (None, None));
    }
}
