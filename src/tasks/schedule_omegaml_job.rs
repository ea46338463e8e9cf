//! `omegaml.notebook.tasks.schedule_omegaml_job(nb_file, **kw)`.
//!
//! `om.runtime.job(name).schedule(run_at=...)` sends it; the worker does
//! `om.jobs.schedule(nb_file, run_at=kw.get('run_at'))` and returns the
//! job's Metadata repr, then `NotebookTask.on_success` records
//! `attributes.state/task_id` and `last_run_time = kw['run_at']`
//! (spec §3.2, §4.3, §8). `run_at` must be a 5-field cron string (or
//! absent, to reuse `attributes.config['run-at']`); omega|ml's dict,
//! `JobSchedule` and natural-language forms fail explicitly here.

use async_trait::async_trait;
use mongodb::bson::Bson;
use tracing::{info, warn};

use super::{bucket_from, Output, Task, TaskContext, TaskError};
use crate::protocol::{TaskMessage, Value};
use crate::schedule::{self, ScheduleError};
use crate::store::Store;

/// The scheduling task.
pub struct ScheduleOmegamlJob {
    store: Store,
}

impl ScheduleOmegamlJob {
    /// A task that reads and writes job metadata in `store`.
    pub fn new(store: Store) -> Self {
        ScheduleOmegamlJob { store }
    }
}

/// A [`ScheduleError`] as the Python exception omega|ml's worker would store.
pub fn schedule_failure(e: &ScheduleError) -> TaskError {
    let (module, exc_type) = e.python_exception();
    TaskError::new(module, exc_type, e.to_string())
}

#[async_trait]
impl Task for ScheduleOmegamlJob {
    fn name(&self) -> &'static str {
        "omegaml.notebook.tasks.schedule_omegaml_job"
    }

    async fn run(&self, _ctx: TaskContext, msg: &TaskMessage) -> Result<Output, TaskError> {
        self.run_value(_ctx, msg).await.map(Output::from)
    }
}

impl ScheduleOmegamlJob {
    async fn run_value(&self, _ctx: TaskContext, msg: &TaskMessage) -> Result<Value, TaskError> {
        let nb_file = super::nb_file_arg(msg, "schedule_omegaml_job")?;
        if msg.args.len() > 1 {
            return Err(TaskError::type_error(format!(
                "schedule_omegaml_job() takes 2 positional arguments but {} were given",
                msg.args.len() + 1
            )));
        }
        let bucket = bucket_from(msg)?;
        let raw_run_at = msg.kwarg("run_at");
        let spec = match raw_run_at {
            None | Some(Value::None) => None,
            Some(Value::Str(s)) if s.is_empty() => None,
            Some(Value::Str(s)) => Some(s.as_str()),
            Some(other) => {
                return Err(TaskError::type_error(format!(
                    "om-worker: schedule_omegaml_job run_at must be a cron string, not {} \
                     (omega|ml's dict and JobSchedule forms are not supported by om-worker)",
                    other.type_name()
                )))
            }
        };
        // NotebookTask.on_success/on_failure: last_run_time = kwargs.get('run_at')
        let last_run_time = match raw_run_at {
            Some(Value::Str(s)) => Some(Bson::String(s.clone())),
            _ => None,
        };
        let result = async {
            let cron = spec.map(schedule::normalize_run_at).transpose()?;
            schedule::schedule(&self.store, &bucket, &nb_file, cron.as_deref(), None).await
        }
        .await;
        match result {
            Ok(job) => {
                if let Some(t) = job.triggers().last().and_then(|t| t.as_document()) {
                    info!(task_id = %msg.id, job = %job.name, "scheduled next run at {}",
                        t.get_str("event").unwrap_or("?"));
                }
                if let Err(e) = self
                    .store
                    .mark_schedule_task(job.id, "SUCCESS", &msg.id, last_run_time)
                    .await
                {
                    // on_success swallows every error too
                    warn!(task_id = %msg.id, "could not record SUCCESS state: {e}");
                }
                Ok(Value::Str(job.metadata_repr()))
            }
            Err(e) => {
                warn!(task_id = %msg.id, job = %nb_file, "schedule failed: {e}");
                if let Ok(Some(job)) = self.store.schedule_job(&bucket, &nb_file).await {
                    if let Err(se) = self
                        .store
                        .mark_schedule_task(job.id, "FAILURE", &msg.id, last_run_time)
                        .await
                    {
                        warn!(task_id = %msg.id, "could not record FAILURE state: {se}");
                    }
                }
                Err(schedule_failure(&e))
            }
        }
    }
}
