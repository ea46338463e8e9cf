//! `omegaml.notebook.tasks.execute_scripts(**kw)`: fire due scheduled runs.
//!
//! omega|ml's beat sends it every 60 s (or our `--beat`, [`run_beat`]). For
//! every job (names starting with `results` skipped) and every PENDING
//! `scheduled` trigger with `now >= run-at`, it sends
//! `run_omegaml_job(name, timeout=None, event=trigger['event'])` to the job's
//! `require` label (else the worker's default label) and immediately
//! re-schedules with `last_run=now` (spec §8). Returns None.
//!
//! Differences from omega|ml, on purpose: a malformed trigger or a failure
//! on one job is logged and the other jobs are still processed (omega|ml
//! stops at the first exception); the task then ends FAILURE naming them.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::NaiveDateTime;
use mongodb::bson::Bson;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::bucket_from;
use super::{Output, Task, TaskContext, TaskError};
use crate::broker::{Broker, BrokerError};
use crate::protocol::publish::{encode_task_v2, TaskSend};
use crate::protocol::{TaskMessage, Value};
use crate::schedule;
use crate::store::{self, Store};

/// The task name beat sends.
pub const EXECUTE_SCRIPTS: &str = "omegaml.notebook.tasks.execute_scripts";
/// The task it submits.
pub const RUN_OMEGAML_JOB: &str = "omegaml.notebook.tasks.run_omegaml_job";

/// The trigger-firing task.
pub struct ExecuteScripts {
    store: Store,
    broker: Arc<dyn Broker>,
    default_queue: String,
}

impl ExecuteScripts {
    /// Runs against `store`, publishes through `broker`; jobs without a
    /// `require` label go to `default_queue` (the worker's first queue, as
    /// omega|ml's worker uses its own `CELERY_DEFAULT_QUEUE`).
    pub fn new(store: Store, broker: Arc<dyn Broker>, default_queue: String) -> Self {
        ExecuteScripts {
            store,
            broker,
            default_queue,
        }
    }
}

/// Declares `queue` as kombu does and publishes `task` to it through the
/// default exchange, as Celery's `send_task(..., queue=L)` does.
pub async fn send_task(
    broker: &dyn Broker,
    queue: &str,
    task: &TaskSend,
) -> Result<(), BrokerError> {
    broker.declare_queue(queue).await?;
    broker.publish("", queue, encode_task_v2(task)).await?;
    crate::telemetry::celery_task_sent(&task.name, queue, 1);
    Ok(())
}

fn bson_to_value(b: &Bson) -> Value {
    match b {
        Bson::String(s) => Value::Str(s.clone()),
        Bson::Null => Value::None,
        Bson::Int32(i) => Value::Int(i64::from(*i)),
        Bson::Int64(i) => Value::Int(*i),
        Bson::Double(f) => Value::Float(*f),
        Bson::Boolean(v) => Value::Bool(*v),
        Bson::DateTime(d) => Value::DateTime {
            naive: schedule::bson_naive(*d),
            offset_seconds: None,
        },
        other => Value::Str(other.to_string()),
    }
}

#[async_trait]
impl Task for ExecuteScripts {
    fn name(&self) -> &'static str {
        EXECUTE_SCRIPTS
    }

    async fn run(&self, _ctx: TaskContext, msg: &TaskMessage) -> Result<Output, TaskError> {
        self.run_value(_ctx, msg).await.map(Output::from)
    }
}

impl ExecuteScripts {
    async fn run_value(&self, _ctx: TaskContext, msg: &TaskMessage) -> Result<Value, TaskError> {
        if !msg.args.is_empty() {
            return Err(TaskError::type_error(format!(
                "execute_scripts() takes 1 positional argument but {} were given",
                msg.args.len() + 1
            )));
        }
        let bucket = bucket_from(msg)?;
        let bucket_kw = msg.kwarg("__bucket").cloned().unwrap_or(Value::None);
        let now: NaiveDateTime = match msg.kwarg("now") {
            None | Some(Value::None) => store::now_local(),
            Some(Value::DateTime {
                naive,
                offset_seconds: None,
            }) => *naive,
            Some(Value::DateTime { .. }) => {
                return Err(TaskError::type_error(
                    "can't compare offset-naive and offset-aware datetimes",
                ))
            }
            Some(other) => {
                return Err(TaskError::type_error(format!(
                    "'>=' not supported between instances of '{}' and 'datetime.datetime'",
                    other.type_name()
                )))
            }
        };
        let parent = Parent {
            id: msg.id.clone(),
            root_id: msg.root_id.clone().unwrap_or_else(|| msg.id.clone()),
        };
        let report = self
            .fire_due(&bucket, bucket_kw, now, Some(parent))
            .await
            .map_err(|e| TaskError::new("pymongo.errors", "OperationFailure", e.to_string()))?;
        if !report.sent.is_empty() {
            info!(
                task_id = %msg.id,
                "execute_scripts: {} run(s) submitted, {} job(s) checked",
                report.sent.len(),
                report.jobs_checked
            );
        }
        if report.problems.is_empty() {
            Ok(Value::None)
        } else {
            Err(TaskError::new(
                "builtins",
                "RuntimeError",
                format!("execute_scripts: {}", report.problems.join("; ")),
            ))
        }
    }
}

/// The task that sent the runs (Celery's `parent_id`/`root_id` headers).
#[derive(Debug, Clone)]
pub struct Parent {
    /// The `execute_scripts` task id.
    pub id: String,
    /// Its workflow root.
    pub root_id: String,
}

/// One `run_omegaml_job` that was sent.
#[derive(Debug, Clone, PartialEq)]
pub struct SentRun {
    /// The job name (first argument).
    pub job: String,
    /// The queue it went to.
    pub queue: String,
    /// Its task id.
    pub task_id: String,
    /// The `event` kwarg (the trigger's `event`).
    pub event: Value,
}

/// What one `execute_scripts` pass did.
#[derive(Debug, Clone, Default)]
pub struct FireReport {
    /// Jobs looked at.
    pub jobs_checked: usize,
    /// Runs sent, in order.
    pub sent: Vec<SentRun>,
    /// Malformed triggers, failed sends and failed re-schedules.
    pub problems: Vec<String>,
}

impl ExecuteScripts {
    /// The body of `execute_scripts` at time `now` (naive local, as
    /// omega|ml's `datetime.now()`): send every due trigger's run, then
    /// re-schedule the job with `last_run=now`. Only listing the jobs
    /// fails the whole pass; per-job problems are collected.
    pub async fn fire_due(
        &self,
        bucket: &str,
        bucket_kw: Value,
        now: NaiveDateTime,
        parent: Option<Parent>,
    ) -> Result<FireReport, store::StoreError> {
        let jobs = self.store.list_schedule_jobs(bucket).await?;
        let mut report = FireReport {
            jobs_checked: jobs.len(),
            ..FireReport::default()
        };
        for job in &jobs {
            let (due, bad) = schedule::due_triggers(job.triggers(), now);
            for b in bad {
                warn!(job = %job.name, "skipping malformed trigger: {b}");
                report.problems.push(format!("{}: {b}", job.name));
            }
            for trigger in due {
                info!("***** now={now} run_at={}", trigger.run_at);
                let queue = job
                    .require_label()
                    .unwrap_or_else(|| self.default_queue.clone());
                let event = bson_to_value(&trigger.event);
                let mut task = TaskSend::new(
                    RUN_OMEGAML_JOB,
                    vec![Value::Str(job.name.clone())],
                    vec![
                        ("timeout".into(), Value::None),
                        ("event".into(), event.clone()),
                        ("pure_python".into(), Value::Bool(false)),
                        ("__bucket".into(), bucket_kw.clone()),
                    ],
                );
                if let Some(p) = &parent {
                    task.parent_id = Some(p.id.clone());
                    task.root_id = Some(p.root_id.clone());
                }
                if let Err(e) = send_task(self.broker.as_ref(), &queue, &task).await {
                    error!(job = %job.name, "could not send run_omegaml_job to {queue:?}: {e}");
                    report
                        .problems
                        .push(format!("{}: sending to {queue:?} failed: {e}", job.name));
                    // not submitted: leave the trigger PENDING for the next pass
                    continue;
                }
                info!(
                    job = %job.name, queue = %queue, run_task_id = %task.id,
                    "fired scheduled run (event {})", trigger.event
                );
                report.sent.push(SentRun {
                    job: job.name.clone(),
                    queue: queue.clone(),
                    task_id: task.id.clone(),
                    event,
                });
                if let Err(e) =
                    schedule::schedule(&self.store, bucket, &job.name, None, Some(now)).await
                {
                    error!(job = %job.name, "re-schedule failed: {e}");
                    report
                        .problems
                        .push(format!("{}: re-schedule failed: {e}", job.name));
                }
            }
        }
        Ok(report)
    }
}

/// `--beat`: sends `execute_scripts` (no args, no kwargs, as celery beat
/// does with omega|ml's `CELERYBEAT_SCHEDULE`) to `queue` every `interval`,
/// the first one an interval after start (beat's first run), until `stop`.
/// Only one beat may run cluster-wide: omega|ml has no locking either.
pub async fn run_beat(
    broker: Arc<dyn Broker>,
    queue: String,
    interval: Duration,
    stop: CancellationToken,
) {
    let interval = interval.max(Duration::from_secs(1));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(queue = %queue, "beat: sending {EXECUTE_SCRIPTS} every {interval:?}");
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {
                let task = TaskSend::new(EXECUTE_SCRIPTS, vec![], vec![]);
                match send_task(broker.as_ref(), &queue, &task).await {
                    Ok(()) => info!(task_id = %task.id, queue = %queue, "beat: sent {EXECUTE_SCRIPTS}"),
                    Err(e) => warn!(queue = %queue, "beat: could not send {EXECUTE_SCRIPTS}: {e}"),
                }
            }
        }
    }
    info!("beat stopped");
}
