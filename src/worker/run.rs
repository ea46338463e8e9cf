//! Running one task under its limits: the soft time limit (the task is asked
//! to stop, Celery raises `SoftTimeLimitExceeded`), the hard time limit (the
//! run is dropped, `TimeLimitExceeded`), a panic (a FAILURE, never a crash),
//! and the lease renewal of a durable task while it runs.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use tracing::{error, warn};

use crate::ledger::Ledger;
use crate::protocol::{ExceptionInfo, TaskMessage};
use crate::tasks::{
    CancelReason, ErrorKind, Output, Task, TaskContext, TaskError, HARD_LIMIT_RECORD_GRACE,
};

/// Runs `task` to its outcome within `hard` seconds.
pub async fn run_limited(
    task: &dyn Task,
    ctx: TaskContext,
    msg: &TaskMessage,
    hard: f64,
) -> Result<Output, TaskError> {
    let soft_timer = ctx
        .soft_time_limit
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .map(|d| {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(d).await;
                ctx.cancel_with(CancelReason::SoftTimeLimit);
            })
        });
    let run = AssertUnwindSafe(task.run(ctx.clone(), msg)).catch_unwind();
    tokio::pin!(run);
    let hard_limit = Duration::try_from_secs_f64(hard).unwrap_or(Duration::MAX);
    let outcome = match tokio::time::timeout(hard_limit, &mut run).await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "unknown panic".into());
            error!(task_id = %msg.id, "task panicked: {what}");
            Err(TaskError {
                exception: ExceptionInfo::new("om_worker.errors", "WorkerInternalError", what),
                traceback: None,
                kind: ErrorKind::Failure,
            })
        }
        Err(_) => {
            if task.durable() {
                // Let a notebook run stop its kernel and record its ERROR run
                // (bounded); the client gets TimeLimitExceeded either way.
                ctx.cancel_with(CancelReason::HardTimeLimit);
                if tokio::time::timeout(HARD_LIMIT_RECORD_GRACE, &mut run)
                    .await
                    .is_err()
                {
                    warn!(task_id = %msg.id, "task did not record its run within {HARD_LIMIT_RECORD_GRACE:?} of the hard time limit; dropped");
                }
            }
            Err(TaskError {
                exception: ExceptionInfo::time_limit_exceeded(hard),
                traceback: Some(format!(
                    "TimeLimitExceeded: hard time limit ({hard}s) exceeded\n"
                )),
                kind: ErrorKind::Failure,
            })
        }
    };
    if let Some(t) = soft_timer {
        t.abort();
    }
    outcome
}

/// Renews the lease of `task_id` every third of it while the task runs;
/// aborted when the run ends.
pub fn renew_lease(ledger: Arc<dyn Ledger>, task_id: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let every = (ledger.lease() / 3).max(Duration::from_millis(200));
        loop {
            tokio::time::sleep(every).await;
            match ledger.renew(&task_id).await {
                Ok(true) => {}
                Ok(false) => {
                    warn!(task_id = %task_id, "lease renewal found no record of ours (claimed by another worker?)")
                }
                Err(e) => warn!(task_id = %task_id, "lease renewal failed: {e}"),
            }
        }
    })
}
