//! `omegaml.notebook.tasks.run_omegaml_job(nb_file, event=None, timeout=None, **kw)`.
//!
//! What omega|ml's `NotebookMixin.run_notebook` + `NotebookTask.on_success`
//! do (`omegaml/notebook/jobs.py`, `omegaml/notebook/tasks.py` in omegaml 0.18.0;
//! `tests/fixtures/groundtruth/` holds their captured MongoDB writes), with the MongoDB round trips cut to
//! what the task needs: one metadata find, one GridFS read, then the results
//! notebook (chunks, files doc, metadata) and one path-level update of the
//! task's metadata. A notebook that raises is a Celery SUCCESS with a run
//! status ERROR; only a missing notebook or a storage failure is a FAILURE.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use tracing::{info, warn};

use super::{split_system_kwargs, CancelReason, Output, Task, TaskContext, TaskError};
use crate::kernel::KernelEnv;
use crate::notebook::executor::{timeout_from_secs, Executor, RunError, RunOptions};
use crate::notebook::model::Notebook;
use crate::protocol::{TaskMessage, Value};
use crate::store::{self, JobRun, Store};

/// The notebook task.
pub struct RunOmegamlJob {
    store: Store,
    executor: Arc<Executor>,
    kernel_env: KernelEnv,
    cwd: std::path::PathBuf,
}

impl RunOmegamlJob {
    /// A task that reads and writes `store` and runs notebooks with `executor`
    /// in kernels with `kernel_env` (omega|ml's, as its worker gives its
    /// kernels: the worker's MongoDB, broker and result backend; it must be
    /// the fork server's and the pool's, or kernels start as plain processes)
    /// that start in `cwd` (`OMEGA_TMP`).
    pub fn new(
        store: Store,
        executor: Arc<Executor>,
        kernel_env: KernelEnv,
        cwd: std::path::PathBuf,
    ) -> Self {
        RunOmegamlJob {
            store,
            executor,
            kernel_env,
            cwd,
        }
    }
}

fn storage_failure(e: store::StoreError) -> TaskError {
    TaskError::new("pymongo.errors", "OperationFailure", e.to_string())
}

/// The results notebook of this task id's run, if the task's metadata says
/// it was recorded (`attributes.task_id` is set with the run, in one update).
fn recorded_run(attributes: &mongodb::bson::Document, task_id: &str) -> Option<String> {
    if attributes.get_str("task_id").ok()? != task_id {
        return None;
    }
    let runs = attributes.get_array("job_runs").ok()?;
    let last = runs.last()?.as_document()?;
    last.get_str("results").ok().map(str::to_owned)
}

/// omega|ml's `repr(Metadata)` of the results notebook: the task's return value.
fn metadata_repr(name: &str, bucket: &str, created: chrono::NaiveDateTime) -> String {
    format!(
        "<Metadata: Metadata(name={name},bucket={bucket},prefix={},kind={},created={})>",
        store::JOBS_PREFIX,
        store::NOTEBOOK_KIND,
        store::python_str(created)
    )
}

#[async_trait]
impl Task for RunOmegamlJob {
    fn name(&self) -> &'static str {
        "omegaml.notebook.tasks.run_omegaml_job"
    }

    fn durable(&self) -> bool {
        true
    }

    async fn run(&self, ctx: TaskContext, msg: &TaskMessage) -> Result<Output, TaskError> {
        self.run_value(ctx, msg).await.map(Output::from)
    }
}

impl RunOmegamlJob {
    async fn run_value(&self, ctx: TaskContext, msg: &TaskMessage) -> Result<Value, TaskError> {
        let (system, _delegate) = split_system_kwargs(&msg.kwargs);
        let nb_file = super::nb_file_arg(msg, "run_omegaml_job")?;
        if msg.args.len() > 3 {
            return Err(TaskError::type_error(format!(
                "run_omegaml_job() takes from 1 to 3 positional arguments but {} were given",
                msg.args.len()
            )));
        }
        let bucket = super::bucket_from(msg)?;
        if system.iter().any(|(k, _)| k == "__auth") {
            // Never log the credentials themselves.
            info!(task_id = %msg.id, "__auth present (not used by om-worker)");
        }
        let cell_timeout = match msg.kwarg("timeout").or(msg.args.get(2)) {
            None | Some(Value::None) => None,
            Some(v) => match v.as_f64().and_then(timeout_from_secs) {
                Some(d) => Some(d),
                None => {
                    return Err(TaskError::type_error(format!(
                        "timeout must be a positive number or None, not {}",
                        v.repr()
                    )))
                }
            },
        };

        // 1. the task notebook (every MongoDB step survives a short outage)
        let id = msg.id.as_str();
        let mut clock = Instant::now();
        let mut lap = move || {
            let now = Instant::now();
            let ms = (now - clock).as_secs_f64() * 1e3;
            clock = now;
            ms
        };
        let Some(meta) = store::retrying("read task metadata", id, |_| {
            self.store.job_metadata(&bucket, &nb_file)
        })
        .await
        .map_err(storage_failure)?
        else {
            return Err(TaskError::new(
                "builtins",
                "AssertionError",
                format!("Cannot run non-existent jobs {nb_file}"),
            ));
        };
        // Idempotence (see `crate::ledger`): a re-queued task whose run was
        // already recorded by a worker that died afterwards is not run again.
        if let Some(done) = recorded_run(&meta.attributes, &msg.id) {
            info!(task_id = %msg.id, notebook = %nb_file, "run already recorded; not running it again");
            return Ok(Value::Str(metadata_repr(
                &done,
                &bucket,
                store::now_local(),
            )));
        }
        let meta_read_ms = lap();
        let fail_state = |e: TaskError| async {
            let marked = store::retrying("record FAILURE state", id, |_| {
                self.store.mark_state(meta.id, "FAILURE", id)
            });
            if let Err(se) = marked.await {
                warn!(task_id = %msg.id, "could not record FAILURE state: {se}");
            }
            e
        };
        let Some(gridfile) = meta.gridfile else {
            return Err(fail_state(TaskError::new(
                "gridfs.errors",
                "NoFile",
                format!(">{nb_file}< does not exist in jobs bucket '{bucket}'"),
            ))
            .await);
        };
        let read = store::retrying("read the notebook", id, |_| {
            self.store.read_file(&bucket, gridfile)
        });
        let bytes = match read.await {
            Ok(b) => b,
            Err(e) => return Err(fail_state(storage_failure(e)).await),
        };
        let gridfs_read_ms = lap();
        let mut notebook = match Notebook::from_slice(&bytes) {
            Ok(nb) => nb,
            Err(e) => {
                return Err(fail_state(TaskError::new(
                    "nbformat.reader",
                    "NotJSONError",
                    format!("{nb_file} is not a valid notebook: {e}"),
                ))
                .await)
            }
        };

        // 2. run it (ts before execution, as omega|ml takes it)
        let ts = store::now_local();
        let ep = meta.kind_meta.get_document("ep_kwargs").ok();
        if !meta.kind_meta.get_bool("keep_output").unwrap_or(false) {
            notebook.clear_outputs();
        }
        let ep_timeout = ep.and_then(|d| d.get("timeout")).and_then(|t| {
            t.as_f64()
                .or_else(|| t.as_i64().map(|i| i as f64))
                .or_else(|| t.as_i32().map(f64::from))
        });
        let opts = RunOptions {
            cell_timeout: ep_timeout.and_then(timeout_from_secs).or(cell_timeout),
            kernel_name: ep
                .and_then(|d| d.get_str("kernel_name").ok())
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
            allow_errors: ep
                .and_then(|d| d.get_bool("allow_errors").ok())
                .unwrap_or(false),
            // --gpus: this slot's own GPU (a pooled kernel with another env is not reused).
            env: Some(match super::gpu_env_for_slot(&ctx.gpus, ctx.slot) {
                Some(gpu) => self.kernel_env.clone().with("CUDA_VISIBLE_DEVICES", gpu),
                None => self.kernel_env.clone(),
            }),
            cwd: Some(self.cwd.clone()),
            cancel: Some(ctx.cancel.clone()),
            ..RunOptions::default()
        };
        lap();
        let outcome = self.executor.run(notebook, opts).await;
        let run_ms = lap();
        // The kernel shuts down in the background, after the result. With
        // --gpus the slot stays taken until it is gone: the slot's next task
        // gets the same GPU and must not meet this kernel's memory on it.
        if let Some(gone) = outcome.kernel_gone.clone() {
            if !ctx.gpus.is_empty() {
                ctx.teardown.defer(gone.wait());
            }
        }
        let (status, message) = match &outcome.error {
            None => ("OK", String::new()),
            Some(RunError::Cancelled { .. }) => (
                "ERROR",
                match ctx.cancelled_because() {
                    // What omega|ml records when Celery raises it in the task.
                    Some(CancelReason::SoftTimeLimit) | None => "SoftTimeLimitExceeded()",
                    Some(CancelReason::Revoked) => "TaskRevokedError('terminated')",
                    Some(CancelReason::Shutdown) => {
                        "WorkerShutdown('interrupted by worker shutdown')"
                    }
                    Some(CancelReason::HardTimeLimit) => {
                        "TimeLimitExceeded('hard time limit exceeded')"
                    }
                }
                .to_owned(),
            ),
            Some(e) => ("ERROR", e.to_string()),
        };
        info!(
            task_id = %msg.id, notebook = %nb_file, status,
            "notebook ran in {:.3?}{}",
            outcome.timings.total,
            outcome.error.as_ref().map(|e| format!(" ({})", e.name())).unwrap_or_default()
        );

        // 3. the results notebook, then the task's metadata
        let results = store::results_name(&nb_file, ts);
        let body = outcome.notebook.to_ipynb_string();
        // Only the text is stored: free the executed notebook (up to the output
        // caps, 50 MiB) before the write holds its chunks too.
        let kernel_startup = outcome.timings.kernel_startup;
        drop(outcome);
        let created = store::now_local();
        let put = store::retrying("store the results notebook", id, |attempt| {
            let (bucket, results, nb_file, body) = (&bucket, &results, &nb_file, &body);
            async move {
                if attempt > 1 {
                    if let Some(done) = self.store.results_notebook_id(bucket, results).await? {
                        return Ok(done);
                    }
                }
                self.store
                    .put_results_notebook(bucket, results, nb_file, body.as_bytes())
                    .await
            }
        });
        if let Err(e) = put.await {
            return Err(fail_state(storage_failure(e)).await);
        }
        let results_write_ms = lap();
        let run = JobRun {
            status,
            ts,
            message: store::truncate_message(&message),
            results: results.clone(),
        };
        // Past the hard time limit the client gets TimeLimitExceeded (a FAILURE):
        // the task's state says so too.
        let state = if ctx.cancelled_because() == Some(CancelReason::HardTimeLimit) {
            "FAILURE"
        } else {
            "SUCCESS"
        };
        store::retrying("record the run", id, |_| {
            self.store.record_run(meta.id, &run, state, id)
        })
        .await
        .map_err(storage_failure)?;
        let kernel_ready_ms = kernel_startup.map_or(0.0, |d| d.as_secs_f64() * 1e3);
        info!(
            task_id = id,
            meta_read_ms,
            gridfs_read_ms,
            kernel_ready_ms,
            execute_ms = run_ms - kernel_ready_ms,
            results_write_ms,
            record_ms = lap(),
            "notebook task timings"
        );
        Ok(Value::Str(metadata_repr(&results, &bucket, created)))
    }
}
