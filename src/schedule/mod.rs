//! Scheduled notebooks, as omega|ml 0.18.0 does them (`omegaml/notebook/jobs.py`:
//! `schedule`, `get_schedule`; `omegaml/notebook/tasks.py`: `execute_scripts`).
//!
//! omega|ml keeps a schedule in the job's metadata: the cron string in
//! `attributes.config['run-at']` and the next run as a PENDING trigger in
//! `attributes.triggers`. `om.jobs.schedule()` (client, or the
//! `schedule_omegaml_job` task) computes the next run with croniter;
//! `execute_scripts` (sent by `celery beat` every 60 s, or by our `--beat`)
//! fires due triggers as `run_omegaml_job(name, event=...)` and re-schedules.
//! This module holds that logic; [`cron`] is the croniter-compatible time
//! arithmetic and `crate::store` (`store/schedule.rs`) the MongoDB access.
//!
//! Times are naive throughout, exactly as omega|ml mixes them: `datetime.now()`
//! (local) for `now` and `job_runs[].ts`, `datetime.utcnow()` when a job has
//! never run, all stored in BSON as if they were UTC.

pub mod cron;

use chrono::NaiveDateTime;
use mongodb::bson::{doc, oid::ObjectId, Bson, Document};

use crate::store::{self, Store, StoreError};

/// Why a schedule could not be computed or stored.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// The job does not exist (Python: `'NoneType' object has no attribute 'attributes'`).
    #[error("job {0:?} does not exist")]
    NoSuchJob(String),
    /// Neither `run_at` nor `attributes.config['run-at']` (Python's ValueError).
    #[error("no run-at specification found, cannot schedule")]
    NoRunAt,
    /// A `run_at` this worker cannot turn into a cron string.
    #[error("{0}")]
    BadSpec(String),
    /// croniter would fail.
    #[error(transparent)]
    Cron(#[from] cron::CronError),
    /// MongoDB failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ScheduleError {
    /// The Python exception (module, type) omega|ml's worker would report.
    pub fn python_exception(&self) -> (&'static str, &'static str) {
        match self {
            ScheduleError::NoSuchJob(_) => ("builtins", "AttributeError"),
            ScheduleError::NoRunAt | ScheduleError::BadSpec(_) => ("builtins", "ValueError"),
            ScheduleError::Cron(cron::CronError::NoNextDate(_)) => {
                ("croniter.croniter", "CroniterBadDateError")
            }
            ScheduleError::Cron(_) => ("croniter.croniter", "CroniterBadCronError"),
            ScheduleError::Store(_) => ("pymongo.errors", "OperationFailure"),
        }
    }
}

/// A job's metadata as scheduling sees it.
#[derive(Debug, Clone)]
pub struct ScheduleJob {
    /// `_id`.
    pub id: ObjectId,
    /// `name` (with `.ipynb`).
    pub name: String,
    /// `bucket`.
    pub bucket: String,
    /// `kind`.
    pub kind: String,
    /// `created` (for the Metadata repr).
    pub created: Option<NaiveDateTime>,
    /// `attributes` (possibly projected).
    pub attributes: Document,
}

impl ScheduleJob {
    /// From a metadata document; `None` without `_id`/`name`.
    pub fn from_document(d: &Document) -> Option<ScheduleJob> {
        Some(ScheduleJob {
            id: d.get_object_id("_id").ok()?,
            name: d.get_str("name").ok()?.to_owned(),
            bucket: d
                .get_str("bucket")
                .unwrap_or(store::DEFAULT_BUCKET)
                .to_owned(),
            kind: d.get_str("kind").unwrap_or(store::NOTEBOOK_KIND).to_owned(),
            created: d.get_datetime("created").ok().map(|c| bson_naive(*c)),
            attributes: d.get_document("attributes").cloned().unwrap_or_default(),
        })
    }

    /// `attributes.triggers` (empty when absent or not a list).
    pub fn triggers(&self) -> &[Bson] {
        self.attributes
            .get_array("triggers")
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The label `om.runtime.job(name)` routes to: `attributes.require.label`
    /// (a plain string `require` is taken as the label too).
    pub fn require_label(&self) -> Option<String> {
        match self.attributes.get("require") {
            Some(Bson::Document(d)) => d.get_str("label").ok().map(str::to_owned),
            Some(Bson::String(s)) => Some(s.clone()),
            _ => None,
        }
        .filter(|l| !l.is_empty())
    }

    /// omega|ml's `repr(Metadata)`, the value `schedule_omegaml_job` returns.
    pub fn metadata_repr(&self) -> String {
        format!(
            "<Metadata: Metadata(name={},bucket={},prefix={},kind={},created={})>",
            self.name,
            self.bucket,
            store::JOBS_PREFIX,
            self.kind,
            self.created
                .map(store::python_str)
                .unwrap_or_else(|| "None".into())
        )
    }
}

/// A BSON date as the naive datetime pymongo returns (`tz_aware=False`).
pub fn bson_naive(d: mongodb::bson::DateTime) -> NaiveDateTime {
    chrono::DateTime::from_timestamp_millis(d.timestamp_millis())
        .unwrap_or_default()
        .naive_utc()
}

/// `datetime.isoformat()` of a naive datetime (microseconds only when non-zero).
pub fn isoformat(ts: NaiveDateTime) -> String {
    use chrono::Timelike;
    if ts.nanosecond() / 1000 == 0 {
        ts.format("%Y-%m-%dT%H:%M:%S").to_string()
    } else {
        ts.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
    }
}

/// `JobSchedule(run_at).cron` for the cron form: five fields separated by
/// single spaces, with JobSchedule's rewrites (`every n` → `*/n`, weekday
/// and month names, lower-casing of the weekday field). omega|ml falls back
/// to its natural-language parser whenever the cron form fails, and that
/// parser reads most unparseable text as `* * * * *`; om-worker does not
/// implement it and fails such specs explicitly instead.
pub fn normalize_run_at(spec: &str) -> Result<String, ScheduleError> {
    let unsupported = |why: &str| {
        ScheduleError::BadSpec(format!(
            "cannot parse run_at {spec:?}: {why}; om-worker accepts 5-field cron strings \
             (omega|ml's natural-language schedules are not supported)"
        ))
    };
    let parts: Vec<&str> = spec.split(' ').collect();
    let [minute, hour, monthday, month, weekday] = parts.as_slice() else {
        return Err(unsupported("not five space-separated fields"));
    };
    let minute = expand_every(minute);
    let hour = expand_every(hour);
    let monthday = expand_every(monthday);
    let month = convert_months(&expand_every(month));
    let weekday = convert_weekdays(&expand_every(weekday));
    let cron = format!("{minute} {hour} {monthday} {month} {weekday}");
    // JobSchedule validates with celery's crontab (stricter than croniter)
    // before croniter.is_valid; anything celery rejects would go to the
    // natural-language parser, so reject it here.
    let limits = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 6)];
    for (i, f) in [&minute, &hour, &monthday, &month, &weekday]
        .iter()
        .enumerate()
    {
        if !celery_field_ok(f, limits[i], i) {
            return Err(unsupported(&format!(
                "field {f:?} is not a celery crontab field"
            )));
        }
    }
    cron::Cron::parse(&cron)?;
    Ok(cron)
}

/// JobSchedule._expand_every.
fn expand_every(v: &str) -> String {
    let mut v = v.to_owned();
    if v.contains("1st") || v.contains("first") {
        v = "1".into();
    }
    if v.starts_with("every ") {
        let numeric = v
            .rsplit(' ')
            .next()
            .is_some_and(|l| !l.is_empty() && l.chars().all(|c| c.is_numeric()));
        v = if numeric {
            v.replace("every ", "*/")
        } else {
            v.replace("every ", "")
        };
        for order in ["nd", "rd", "th"] {
            v = v.replace(order, "");
        }
    } else {
        v = v.replace("every", "*");
    }
    v.trim().to_owned()
}

/// JobSchedule._convert_weekdays (lower-cases, long → short names).
fn convert_weekdays(v: &str) -> String {
    let mut v = v.to_lowercase();
    for (full, short) in [
        ("monday", "mon"),
        ("tuesday", "tue"),
        ("wednesday", "wed"),
        ("thursday", "thu"),
        ("friday", "fri"),
        ("saturday", "sat"),
        ("sunday", "sun"),
        ("weekday", "mon-fri"),
        ("workday", "mon-fri"),
        ("working day", "mon-fri"),
        ("weekend", "sat-sun"),
        ("week-end", "sat-sun"),
        ("week end", "sat-sun"),
    ] {
        v = v.replace(full, short);
    }
    v
}

const MONTH_NAMES: [&str; 12] = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
];

/// JobSchedule._convert_months (only when a lower-case name is present).
fn convert_months(v: &str) -> String {
    let has = MONTH_NAMES
        .iter()
        .any(|m| v.contains(m) || v.contains(&m[..3]));
    if !has {
        return v.to_owned();
    }
    let mut v = v.to_lowercase();
    for (i, m) in MONTH_NAMES.iter().enumerate() {
        v = v.replace(m, &(i + 1).to_string());
        v = v.replace(&m[..3], &(i + 1).to_string());
    }
    v
}

/// Whether celery's `crontab_parser` accepts a field: `*`, `*/n`, values,
/// `a-b`, `a-b/n` (names only for weekday and month), within its limits.
fn celery_field_ok(f: &str, (min, max): (u32, u32), idx: usize) -> bool {
    let value_ok = |s: &str| -> bool {
        if let Ok(n) = s.parse::<u32>() {
            return n >= min && n <= max && s.chars().all(|c| c.is_ascii_digit());
        }
        let s = s.to_ascii_lowercase();
        match idx {
            3 => MONTH_NAMES.iter().any(|m| m[..3] == *s || *m == s),
            4 => ["sun", "mon", "tue", "wed", "thu", "fri", "sat"].contains(&s.as_str()),
            _ => false,
        }
    };
    let step_ok = |s: &str| s.parse::<u32>().is_ok_and(|n| n > 0);
    !f.is_empty()
        && f.split(',').all(|part| {
            let (base, step) = match part.split_once('/') {
                Some((b, s)) => (b, Some(s)),
                None => (part, None),
            };
            if step.is_some_and(|s| !step_ok(s)) {
                return false;
            }
            if base == "*" {
                return true;
            }
            match base.split_once('-') {
                Some((a, b)) => value_ok(a) && value_ok(b),
                // celery rejects "5/15" (a start with a step)
                None => step.is_none() && value_ok(base),
            }
        })
}

/// The trigger omega|ml appends: `{'event-kind': 'scheduled', 'event':
/// next.isoformat(), 'run-at': next, 'status': 'PENDING'}`.
pub fn scheduled_trigger(next: NaiveDateTime) -> Document {
    doc! {
        "event-kind": "scheduled",
        "event": isoformat(next),
        "run-at": store::naive_as_bson(next),
        "status": "PENDING",
    }
}

/// `schedule()`'s trigger list: every trigger whose `status` is not
/// `PENDING` (those without a status included), then the new one.
pub fn reschedule_triggers(existing: &[Bson], next: NaiveDateTime) -> Vec<Bson> {
    let mut out: Vec<Bson> = existing
        .iter()
        .filter(|t| match t {
            Bson::Document(d) => d.get_str("status").ok() != Some("PENDING"),
            _ => true,
        })
        .cloned()
        .collect();
    out.push(Bson::Document(scheduled_trigger(next)));
    out
}

/// `schedule()`'s base time: `last_run`, else `job_runs[-1].ts`, else `utcnow()`.
pub fn base_time(attributes: &Document, last_run: Option<NaiveDateTime>) -> NaiveDateTime {
    if let Some(t) = last_run {
        return t;
    }
    attributes
        .get_array("job_runs")
        .ok()
        .and_then(|runs| runs.last())
        .and_then(|r| r.as_document())
        .and_then(|r| r.get_datetime("ts").ok())
        .map(|d| bson_naive(*d))
        .unwrap_or_else(|| chrono::Utc::now().naive_utc())
}

/// A trigger `execute_scripts` should fire now.
#[derive(Debug, Clone, PartialEq)]
pub struct DueTrigger {
    /// `trigger['event']`, passed as `run_omegaml_job(event=...)`.
    pub event: Bson,
    /// `trigger['run-at']`.
    pub run_at: NaiveDateTime,
}

/// The scheduled PENDING triggers with `now >= run-at`, in list order.
/// Malformed triggers (no `event-kind`, `run-at` not a date) make
/// omega|ml's `execute_scripts` raise; they are returned in the error list
/// here so the caller can skip them and report.
pub fn due_triggers(triggers: &[Bson], now: NaiveDateTime) -> (Vec<DueTrigger>, Vec<String>) {
    let mut due = Vec::new();
    let mut bad = Vec::new();
    for (i, t) in triggers.iter().enumerate() {
        let Some(d) = t.as_document() else {
            bad.push(format!("trigger #{i} is not a document"));
            continue;
        };
        if d.get_str("event-kind").ok() != Some("scheduled")
            || d.get_str("status").ok() != Some("PENDING")
        {
            continue;
        }
        match d.get_datetime("run-at") {
            Ok(run_at) => {
                let run_at = bson_naive(*run_at);
                if now >= run_at {
                    due.push(DueTrigger {
                        event: d.get("event").cloned().unwrap_or(Bson::Null),
                        run_at,
                    });
                }
            }
            Err(_) => bad.push(format!("trigger #{i}: run-at is not a datetime")),
        }
    }
    (due, bad)
}

/// `om.jobs.schedule(name, run_at=run_at, last_run=last_run)`: stores
/// `config['run-at']` (when given) and the next PENDING trigger. `run_at`
/// must already be normalised ([`normalize_run_at`]). Returns the job as
/// re-read after the update.
pub async fn schedule(
    store: &Store,
    bucket: &str,
    name: &str,
    run_at: Option<&str>,
    last_run: Option<NaiveDateTime>,
) -> Result<ScheduleJob, ScheduleError> {
    let job = store
        .schedule_job(bucket, name)
        .await?
        .ok_or_else(|| ScheduleError::NoSuchJob(name.to_owned()))?;
    let mut config = job
        .attributes
        .get_document("config")
        .cloned()
        .unwrap_or_default();
    let interval = match run_at.filter(|s| !s.is_empty()) {
        Some(spec) => {
            config.insert("run-at", spec);
            spec.to_owned()
        }
        None => match config.get("run-at") {
            Some(Bson::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(ScheduleError::NoRunAt),
        },
    };
    let base = base_time(&job.attributes, last_run);
    let next = cron::next_after(&interval, base)?;
    let triggers = reschedule_triggers(job.triggers(), next);
    store
        .set_schedule(job.id, triggers.clone(), config.clone())
        .await?;
    let mut job = job;
    job.attributes.insert("triggers", triggers);
    job.attributes.insert("config", config);
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dt(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").expect("test datetime")
    }

    #[test]
    fn normalizes_like_jobschedule() {
        let n = |s: &str| normalize_run_at(s).ok();
        assert_eq!(n("* * * * *").as_deref(), Some("* * * * *"));
        assert_eq!(n("*/5 * * * MON").as_deref(), Some("*/5 * * * mon"));
        assert_eq!(
            n("0 9 * * monday-friday").as_deref(),
            Some("0 9 * * mon-fri")
        );
        assert_eq!(n("0 0 1 jan,mar *").as_deref(), Some("0 0 1 1,3 *"));
        assert_eq!(n("5-5 * * * *").as_deref(), Some("5-5 * * * *"));
        assert_eq!(n("every 5 * * * mon").as_deref(), None);
        // what omega|ml would read as natural language: explicit errors here
        for bad in [
            "every 5 minutes",
            "0  0 * * *",
            "61 * * * *",
            "0 0 * * 7",
            "0 0 ? * 1",
            "5/15 * * * *",
        ] {
            assert!(
                matches!(normalize_run_at(bad), Err(ScheduleError::BadSpec(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn triggers_keep_history_and_replace_pending() {
        let old = vec![
            Bson::Document(doc! {"event-kind": "scheduled", "event": "a", "status": "OK"}),
            Bson::Document(doc! {"event-kind": "scheduled", "event": "b", "status": "PENDING"}),
            Bson::Document(doc! {"event-kind": "scheduled", "event": "c"}),
        ];
        let next = dt("2024-01-01 10:01:00");
        let t = reschedule_triggers(&old, next);
        assert_eq!(t.len(), 3);
        assert_eq!(t[0], old[0]);
        assert_eq!(t[1], old[2]);
        assert_eq!(
            t[2],
            Bson::Document(doc! {
                "event-kind": "scheduled",
                "event": "2024-01-01T10:01:00",
                "run-at": store::naive_as_bson(next),
                "status": "PENDING",
            })
        );
    }

    #[test]
    fn due_when_now_reaches_run_at() {
        let run_at = dt("2024-01-01 10:01:00");
        let triggers = vec![Bson::Document(scheduled_trigger(run_at))];
        assert!(due_triggers(&triggers, dt("2024-01-01 10:00:59.999"))
            .0
            .is_empty());
        let (due, bad) = due_triggers(&triggers, run_at);
        assert!(bad.is_empty());
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].event, Bson::String("2024-01-01T10:01:00".into()));
    }

    #[test]
    fn base_time_prefers_last_run_then_job_runs() {
        let ts = dt("2024-02-03 04:05:06.789");
        let attrs = doc! {"job_runs": [{"status": "OK", "ts": store::naive_as_bson(ts)}]};
        assert_eq!(base_time(&attrs, None), ts);
        let explicit = dt("2025-01-01 00:00:00");
        assert_eq!(base_time(&attrs, Some(explicit)), explicit);
    }
}
