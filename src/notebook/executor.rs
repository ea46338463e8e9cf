//! The notebook executor: nbclient's `NotebookClient.execute` in Rust, with hard limits.
//!
//! Semantics follow nbclient 0.11 (what omega|ml's `ExecutePreprocessor` runs):
//! - code cells run in order; markdown/raw cells, empty code cells and cells tagged
//!   `skip-execution` are left untouched;
//! - outputs are built like `nbformat.v4.output_from_msg`; `update_display_data` rewrites every
//!   earlier output with the same `display_id` (in any cell); `clear_output(wait=True)` clears on
//!   the next output;
//! - `execution_count` is the number of code cells executed so far (nbclient passes
//!   `code_cells_executed + 1`); `metadata.execution` gets the four `record_timing` stamps taken
//!   from the kernel's message headers; `metadata.language_info` comes from `kernel_info_reply`;
//! - the first error stops the run (`allow_errors=False`) unless the cell is tagged
//!   `raises-exception`, `allow_errors` is set or the ename is in `allow_error_names`; the
//!   executed notebook (with the error output) is always returned;
//! - after `execute_reply` we wait up to `iopub_timeout` for the iopub `idle` so trailing output
//!   is not lost.
//!
//! Additions over nbclient: a whole-run timeout, per-cell timeout that interrupts the kernel and
//! then kills it, kernel death detection from the child process status (not a 1 s liveness
//! poll), bounded output (per cell and per notebook, excess dropped as it arrives, with a visible
//! marker), optional RLIMIT_AS, cancellation, and guaranteed process-group cleanup.
//!
//! Stream outputs: nbclient's default (`coalesce_streams=False`) keeps every iopub `stream`
//! message as its own output, so the number of outputs depends on ipykernel's flush timing.
//! [`StreamMerge::Consecutive`] (our default) appends a stream message to the previous output
//! when that is a stream of the same name, which is how Jupyter front-ends render them anyway
//! and keeps memory per output small. [`StreamMerge::None`] reproduces nbclient's default and
//! [`StreamMerge::Coalesce`] nbclient's `coalesce_streams=True`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::model::{Cell, Notebook};
use crate::kernel::{
    Channel, ClientEvent, Kernel, KernelEnv, KernelError, KernelExit, KernelLauncher,
    KernelTracker, LaunchOptions, LocalLauncher, Message, Transport,
};

/// How consecutive `stream` messages become outputs (see module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamMerge {
    /// One output per iopub message (nbclient default).
    None,
    /// Append to the previous output when it is a stream with the same name (default).
    #[default]
    Consecutive,
    /// nbclient `coalesce_streams=True`: after the cell, merge all streams of a name into the
    /// first, apply `\r`/`\b`, and put stdout before an adjacent stderr.
    Coalesce,
}

/// Executor settings that do not change per run.
#[derive(Clone)]
pub struct ExecutorConfig {
    /// Starts kernels (local processes, later a pool or fork server).
    pub launcher: Arc<dyn KernelLauncher>,
    /// Kernel used when neither the run nor the notebook names one (`python3`).
    pub default_kernel: String,
    /// Kernel environment (omega|ml: [`KernelEnv::omega`]).
    pub env: KernelEnv,
    /// Kernel working directory (omega|ml: `OMEGA_TMP`).
    pub cwd: Option<PathBuf>,
    /// Kernel start → ready limit (nbclient `startup_timeout` 60 s).
    pub startup_timeout: Duration,
    /// After `execute_reply`, how long to wait for iopub `idle` (nbclient `iopub_timeout` 4 s).
    pub iopub_timeout: Duration,
    /// After an interrupt (timeout), how long the kernel gets to report before it is killed.
    pub interrupt_grace: Duration,
    /// After `shutdown_request`, how long before the process group is SIGKILLed.
    pub shutdown_grace: Duration,
    /// Output bytes kept per cell (default 10 MiB).
    pub max_cell_output_bytes: usize,
    /// Output bytes kept per notebook (default 50 MiB).
    pub max_total_output_bytes: usize,
    /// Stream output merging.
    pub stream_merge: StreamMerge,
    /// RLIMIT_AS for the kernel process (None = unlimited).
    pub memory_limit_bytes: Option<u64>,
    /// Socket transport (ipc default).
    pub transport: Transport,
    /// Write `metadata.execution` timings (nbclient `record_timing`, default true).
    pub record_timing: bool,
    /// Return as soon as the last cell is done and shut the kernel down in
    /// the background (default false). ipykernel's orderly shutdown takes about
    /// 0.5 s of mostly waiting; a worker should not hold a task slot (and the
    /// task's result) for it. The kernel still gets its `shutdown_request` and
    /// grace; [`Executor::wait_background_shutdowns`] waits for the stragglers.
    pub background_shutdown: bool,
}

impl std::fmt::Debug for ExecutorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutorConfig")
            .field("default_kernel", &self.default_kernel)
            .field("cwd", &self.cwd)
            .field("startup_timeout", &self.startup_timeout)
            .field("max_cell_output_bytes", &self.max_cell_output_bytes)
            .field("max_total_output_bytes", &self.max_total_output_bytes)
            .field("stream_merge", &self.stream_merge)
            .field("memory_limit_bytes", &self.memory_limit_bytes)
            .finish_non_exhaustive()
    }
}

impl ExecutorConfig {
    /// Defaults around a launcher.
    pub fn new(launcher: Arc<dyn KernelLauncher>) -> Self {
        ExecutorConfig {
            launcher,
            default_kernel: "python3".into(),
            env: KernelEnv::inherit(),
            cwd: None,
            startup_timeout: Duration::from_secs(60),
            iopub_timeout: Duration::from_secs(4),
            interrupt_grace: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(2),
            max_cell_output_bytes: 10 * 1024 * 1024,
            max_total_output_bytes: 50 * 1024 * 1024,
            stream_merge: StreamMerge::default(),
            memory_limit_bytes: None,
            transport: Transport::Ipc,
            record_timing: true,
            background_shutdown: false,
        }
    }

    /// Defaults with a [`LocalLauncher`] for `python` that registers its kernels in `kernels`.
    pub fn local(python: impl Into<PathBuf>, kernels: KernelTracker) -> Self {
        ExecutorConfig::new(Arc::new(LocalLauncher::new(python, kernels)))
    }
}

/// Per-run options.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Whole-run limit (kernel start included).
    pub timeout: Option<Duration>,
    /// Per-cell limit (omega|ml's task `timeout`; nbclient `timeout`).
    pub cell_timeout: Option<Duration>,
    /// Kernel name; overrides the notebook's `metadata.kernelspec.name`.
    pub kernel_name: Option<String>,
    /// Continue after errors (nbclient `allow_errors`).
    pub allow_errors: bool,
    /// Error names that do not stop the run (nbclient `allow_error_names`).
    pub allow_error_names: Vec<String>,
    /// Environment for this run (replaces the config's, e.g. per-task credentials).
    pub env: Option<KernelEnv>,
    /// Working directory for this run (replaces the config's).
    pub cwd: Option<PathBuf>,
    /// Receives per-cell progress.
    pub progress: Option<mpsc::UnboundedSender<Progress>>,
    /// Cancels the run (the kernel is killed; e.g. Celery revoke).
    pub cancel: Option<CancellationToken>,
}

/// Progress events, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// A kernel is being started.
    KernelStarting {
        /// Kernel name.
        kernel_name: String,
    },
    /// The kernel answered kernel_info and iopub is live.
    KernelReady {
        /// Spawn → ready.
        startup: Duration,
        /// Kernel pid (= process group).
        pid: i32,
    },
    /// A code cell was sent.
    CellStarted {
        /// Index in `cells`.
        cell_index: usize,
        /// 1-based number among code cells that will run.
        execution_count: i64,
        /// Number of code cells that will run (non-empty, not skipped).
        code_cells: usize,
    },
    /// A code cell finished (successfully or not).
    CellFinished {
        /// Index in `cells`.
        cell_index: usize,
        /// Send → idle.
        duration: Duration,
        /// `None` when OK, else the error name (`TimeoutError`/`DeadKernelError` for limits).
        error: Option<String>,
    },
    /// A code cell was skipped (`skip-execution` tag).
    CellSkipped {
        /// Index in `cells`.
        cell_index: usize,
    },
}

/// An error raised by a cell (nbclient `CellExecutionError`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellError {
    /// Index in `cells`.
    pub cell_index: usize,
    /// Exception class name.
    pub ename: String,
    /// Exception value.
    pub evalue: String,
    /// Traceback lines (with ANSI colours, as the kernel sent them).
    pub traceback: Vec<String>,
    /// `str(CellExecutionError)` as nbclient builds it (cell source, stream outputs,
    /// traceback); omega|ml stores `message[:80] + '...' + message[-80:]` in `job_runs`.
    pub message: String,
}

/// Why a run did not complete.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RunError {
    /// A cell raised and errors were not allowed.
    #[error("{}", .0.message)]
    Cell(CellError),
    /// A cell ran longer than `cell_timeout`; it was interrupted, then the kernel killed.
    #[error("{message}")]
    CellTimeout {
        /// Index in `cells`.
        cell_index: usize,
        /// The limit.
        timeout: Duration,
        /// nbclient's `CellTimeoutError` text.
        message: String,
    },
    /// The whole run exceeded `timeout`.
    #[error("notebook run timed out after {timeout:?}")]
    RunTimeout {
        /// The cell running at the time (None: during kernel start).
        cell_index: Option<usize>,
        /// The limit.
        timeout: Duration,
    },
    /// The kernel process exited (crash, `os._exit`, OOM kill).
    #[error("Kernel died ({exit})")]
    KernelDied {
        /// The cell running at the time.
        cell_index: Option<usize>,
        /// How it ended.
        exit: String,
    },
    /// The kernel could not be started.
    #[error("{0}")]
    Startup(String),
    /// The run was cancelled.
    #[error("notebook run cancelled")]
    Cancelled {
        /// The cell running at the time.
        cell_index: Option<usize>,
    },
    /// Messaging failed while the kernel process was still alive.
    #[error("kernel communication failed: {0}")]
    Kernel(String),
}

impl RunError {
    /// The cell that was running, if any.
    pub fn cell_index(&self) -> Option<usize> {
        match self {
            RunError::Cell(e) => Some(e.cell_index),
            RunError::CellTimeout { cell_index, .. } => Some(*cell_index),
            RunError::RunTimeout { cell_index, .. }
            | RunError::KernelDied { cell_index, .. }
            | RunError::Cancelled { cell_index } => *cell_index,
            RunError::Startup(_) | RunError::Kernel(_) => None,
        }
    }

    /// Short name for logs and progress: the ename, or `TimeoutError`, `DeadKernelError`, ….
    pub fn name(&self) -> &str {
        match self {
            RunError::Cell(e) => &e.ename,
            RunError::CellTimeout { .. } | RunError::RunTimeout { .. } => "TimeoutError",
            RunError::KernelDied { .. } => "DeadKernelError",
            RunError::Startup(_) => "KernelStartupError",
            RunError::Cancelled { .. } => "Cancelled",
            RunError::Kernel(_) => "KernelError",
        }
    }
}

/// Time spent per cell.
#[derive(Debug, Clone, PartialEq)]
pub struct CellTiming {
    /// Index in `cells`.
    pub cell_index: usize,
    /// Send → idle (or → failure).
    pub duration: Duration,
}

/// Timings of one run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunTimings {
    /// Spawn → ready (None when the kernel did not start).
    pub kernel_startup: Option<Duration>,
    /// Whole run including shutdown.
    pub total: Duration,
    /// Executed cells.
    pub cells: Vec<CellTiming>,
}

/// Result of [`Executor::run`]: the executed notebook is always present.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The notebook with outputs of every cell that ran (including the failing one).
    pub notebook: Notebook,
    /// Why the run stopped early (None = every cell ran; allowed errors are not reported here).
    pub error: Option<RunError>,
    /// Timings.
    pub timings: RunTimings,
    /// How the kernel process ended.
    pub kernel_exit: Option<KernelExit>,
    /// True when some output was dropped because of the size caps.
    pub output_truncated: bool,
    /// The kernel's end, when it is being shut down in the background
    /// ([`ExecutorConfig::background_shutdown`]); `None` when it is gone.
    pub kernel_gone: Option<KernelGone>,
}

/// Resolves once a kernel shut down in the background has ended (or its
/// shutdown was abandoned): a worker that must not start the next task on
/// the same GPU while this kernel still holds it waits for this.
#[derive(Debug, Clone)]
pub struct KernelGone(tokio::sync::watch::Receiver<bool>);

impl KernelGone {
    /// Waits until the kernel is gone.
    pub async fn wait(mut self) {
        // An error means the shutdown task ended without saying so: nothing left to wait for.
        let _ = self.0.wait_for(|gone| *gone).await;
    }
}

impl RunOutcome {
    /// True when the run completed without an (unallowed) error.
    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }
}

/// Runs notebooks. Cheap to clone; every run gets a fresh kernel from the launcher. Clones
/// share the launcher and the background shutdowns.
#[derive(Debug, Clone)]
pub struct Executor {
    config: ExecutorConfig,
    /// Kernels being shut down after their run returned (see
    /// [`ExecutorConfig::background_shutdown`]), so the owner can wait for them at exit.
    background_shutdowns: tokio_util::task::TaskTracker,
}

/// State shared across the cells of one run.
struct RunState {
    /// display_id → cell index → output indices (nbclient `_display_id_map`).
    display_map: HashMap<String, HashMap<usize, Vec<usize>>>,
    /// Output bytes retained by finished cells.
    total_bytes: usize,
    truncated_any: bool,
}

/// State of the cell being executed.
struct CellState {
    index: usize,
    msg_id: String,
    clear_before_next: bool,
    bytes: usize,
    truncated: bool,
    reply: Option<Message>,
    idle: bool,
}

enum Stop {
    Deadline { cell: bool },
    Died(KernelExit),
    Cancelled,
    Transport(String),
}

impl Executor {
    /// An executor with this configuration.
    pub fn new(config: ExecutorConfig) -> Self {
        Executor {
            config,
            background_shutdowns: tokio_util::task::TaskTracker::new(),
        }
    }

    /// Waits (at most `within`) until every kernel this executor (or a clone) shut down in
    /// the background has exited; returns false if some had not. Kernels left over are killed
    /// with their process groups by the owner's [`KernelTracker::kill_all`].
    pub async fn wait_background_shutdowns(&self, within: Duration) -> bool {
        self.background_shutdowns.close();
        let done = tokio::time::timeout(within, self.background_shutdowns.wait())
            .await
            .is_ok();
        self.background_shutdowns.reopen();
        done
    }

    /// The configuration.
    pub fn config(&self) -> &ExecutorConfig {
        &self.config
    }

    /// Runs `notebook` in a fresh kernel and returns it executed, with the first error if the
    /// run stopped early. Never leaves the kernel running.
    pub async fn run(&self, mut notebook: Notebook, opts: RunOptions) -> RunOutcome {
        let started = Instant::now();
        let run_deadline = opts.timeout.and_then(deadline_after);
        let kernel_name = opts
            .kernel_name
            .clone()
            .filter(|k| !k.is_empty())
            .or_else(|| notebook.kernel_name().map(str::to_string))
            .unwrap_or_else(|| self.config.default_kernel.clone());
        emit(
            &opts,
            Progress::KernelStarting {
                kernel_name: kernel_name.clone(),
            },
        );

        let launch_opts = LaunchOptions {
            kernel_name,
            env: opts.env.clone().unwrap_or_else(|| self.config.env.clone()),
            cwd: opts.cwd.clone().or_else(|| self.config.cwd.clone()),
            startup_timeout: self.config.startup_timeout,
            memory_limit_bytes: self.config.memory_limit_bytes,
            transport: self.config.transport,
            extra_args: Vec::new(),
        };
        let mut timings = RunTimings::default();
        let cancel = opts.cancel.clone().unwrap_or_default();
        let launch = self.config.launcher.launch(&launch_opts);
        let launched = tokio::select! {
            r = launch => r.map_err(|e| match e {
                KernelError::Died(m) => RunError::KernelDied { cell_index: None, exit: m },
                other => RunError::Startup(other.to_string()),
            }),
            _ = sleep_until_opt(run_deadline) => Err(RunError::RunTimeout {
                cell_index: None,
                timeout: opts.timeout.unwrap_or_default(),
            }),
            _ = cancel.cancelled() => Err(RunError::Cancelled { cell_index: None }),
        };
        let mut kernel = match launched {
            Ok(k) => k,
            Err(e) => {
                timings.total = started.elapsed();
                return RunOutcome {
                    notebook,
                    error: Some(e),
                    timings,
                    kernel_exit: None,
                    output_truncated: false,
                    kernel_gone: None,
                };
            }
        };
        timings.kernel_startup = Some(kernel.startup_time);
        emit(
            &opts,
            Progress::KernelReady {
                startup: kernel.startup_time,
                pid: kernel.pid(),
            },
        );
        if let Some(li) = kernel.kernel_info.get("language_info") {
            notebook.metadata.insert("language_info".into(), li.clone());
        } else {
            tracing::warn!("kernel_info_reply has no language_info");
        }

        let code_cells = notebook
            .cells
            .iter()
            .filter(|c| c.is_code() && !c.source.trim().is_empty() && !c.has_tag("skip-execution"))
            .count();
        let mut state = RunState {
            display_map: HashMap::new(),
            total_bytes: 0,
            truncated_any: false,
        };
        let mut executed: i64 = 0;
        let mut error = None;
        for index in 0..notebook.cells.len() {
            let cell = &notebook.cells[index];
            if !cell.is_code() || cell.source.trim().is_empty() {
                continue;
            }
            if cell.has_tag("skip-execution") {
                emit(&opts, Progress::CellSkipped { cell_index: index });
                continue;
            }
            executed += 1;
            emit(
                &opts,
                Progress::CellStarted {
                    cell_index: index,
                    execution_count: executed,
                    code_cells,
                },
            );
            let cell_started = Instant::now();
            let result = self
                .execute_cell(
                    &mut kernel,
                    &mut notebook,
                    &mut state,
                    index,
                    executed,
                    &opts,
                    run_deadline,
                    &cancel,
                )
                .await;
            let duration = cell_started.elapsed();
            timings.cells.push(CellTiming {
                cell_index: index,
                duration,
            });
            emit(
                &opts,
                Progress::CellFinished {
                    cell_index: index,
                    duration,
                    error: result.as_ref().err().map(|e| e.name().to_string()),
                },
            );
            if let Err(e) = result {
                error = Some(e);
                break;
            }
        }

        // Orderly shutdown after success or a cell error; immediate kill when the kernel is
        // stuck, dead or the run was cancelled.
        let graceful = matches!(error, None | Some(RunError::Cell(_)));
        let grace = if graceful {
            self.config.shutdown_grace
        } else {
            Duration::ZERO
        };
        let (kernel_exit, kernel_gone) = if graceful && self.config.background_shutdown {
            let (gone, rx) = tokio::sync::watch::channel(false);
            self.background_shutdowns.spawn(async move {
                kernel.shutdown(grace).await;
                let _ = gone.send(true);
            });
            (None, Some(KernelGone(rx)))
        } else {
            (kernel.shutdown(grace).await, None)
        };
        timings.total = started.elapsed();
        RunOutcome {
            notebook,
            error,
            timings,
            kernel_exit,
            output_truncated: state.truncated_any,
            kernel_gone,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn execute_cell(
        &self,
        kernel: &mut Kernel,
        nb: &mut Notebook,
        state: &mut RunState,
        index: usize,
        execution_count: i64,
        opts: &RunOptions,
        run_deadline: Option<tokio::time::Instant>,
        cancel: &CancellationToken,
    ) -> Result<(), RunError> {
        let allows_errors = opts.allow_errors || nb.cells[index].has_tag("raises-exception");
        {
            let cell = &mut nb.cells[index];
            if self.config.record_timing {
                cell.metadata
                    .insert("execution".into(), Value::Object(Map::new()));
            }
            cell.outputs.clear();
        }
        let code = nb.cells[index].source.clone();
        let msg_id = kernel
            .client
            .send_shell(
                "execute_request",
                json!({
                    "code": code,
                    "silent": false,
                    "store_history": true,
                    "user_expressions": {},
                    "allow_stdin": false,
                    "stop_on_error": !allows_errors,
                }),
            )
            .await;
        let msg_id = match msg_id {
            Ok(id) => id,
            // A failed send usually means the kernel is gone: report that, not the symptom.
            Err(e) => {
                return Err(
                    match tokio::time::timeout(Duration::from_secs(2), kernel.process.exited())
                        .await
                    {
                        Ok(exit) => RunError::KernelDied {
                            cell_index: Some(index),
                            exit: exit.to_string(),
                        },
                        Err(_) => RunError::Kernel(e.to_string()),
                    },
                )
            }
        };
        let mut cs = CellState {
            index,
            msg_id,
            clear_before_next: false,
            bytes: 0,
            truncated: false,
            reply: None,
            idle: false,
        };
        let cell_deadline = opts.cell_timeout.and_then(deadline_after);

        let stop = self
            .pump(
                kernel,
                nb,
                state,
                &mut cs,
                cell_deadline,
                run_deadline,
                cancel,
            )
            .await;

        let outcome = match stop {
            None => Ok(()),
            Some(Stop::Deadline { cell }) => {
                // Interrupt, give the kernel a moment to report (KeyboardInterrupt output),
                // then the caller kills it.
                if let Err(e) = kernel.interrupt().await {
                    tracing::warn!(error = %e, "interrupt failed");
                }
                let grace = tokio::time::Instant::now() + self.config.interrupt_grace;
                let _ = self
                    .pump(kernel, nb, state, &mut cs, Some(grace), None, cancel)
                    .await;
                if cell {
                    let timeout = opts.cell_timeout.unwrap_or_default();
                    Err(RunError::CellTimeout {
                        cell_index: index,
                        timeout,
                        message: timeout_message(&nb.cells[index], timeout),
                    })
                } else {
                    Err(RunError::RunTimeout {
                        cell_index: Some(index),
                        timeout: opts.timeout.unwrap_or_default(),
                    })
                }
            }
            Some(Stop::Died(exit)) => Err(RunError::KernelDied {
                cell_index: Some(index),
                exit: exit.to_string(),
            }),
            Some(Stop::Cancelled) => Err(RunError::Cancelled {
                cell_index: Some(index),
            }),
            Some(Stop::Transport(e)) => Err(RunError::Kernel(e)),
        };

        if cs.truncated {
            state.truncated_any = true;
        }
        state.total_bytes += cs.bytes;
        let cell = &mut nb.cells[index];
        if outcome.is_ok() {
            cell.execution_count = Some(execution_count);
        }
        if self.config.stream_merge == StreamMerge::Coalesce {
            coalesce_streams(&mut cell.outputs);
        }
        outcome?;

        if let Some(reply) = &cs.reply {
            if reply.content.get("status").and_then(Value::as_str) == Some("error") {
                let ename = str_field(&reply.content, "ename").unwrap_or("<Error>");
                let allowed = allows_errors || opts.allow_error_names.iter().any(|n| n == ename);
                if !allowed {
                    let traceback: Vec<String> = match reply.content.get("traceback") {
                        Some(Value::Array(tb)) => tb
                            .iter()
                            .filter_map(Value::as_str)
                            .map(str::to_string)
                            .collect(),
                        _ => Vec::new(),
                    };
                    let evalue = str_field(&reply.content, "evalue")
                        .unwrap_or("")
                        .to_string();
                    let message = cell_error_message(cell, &traceback, ename, &evalue);
                    return Err(RunError::Cell(CellError {
                        cell_index: index,
                        ename: ename.to_string(),
                        evalue,
                        traceback,
                        message,
                    }));
                }
            }
        }
        Ok(())
    }

    /// Processes kernel events for the current cell until reply + idle, a limit, death or
    /// cancellation. Returns `None` when the cell completed.
    #[allow(clippy::too_many_arguments)]
    async fn pump(
        &self,
        kernel: &mut Kernel,
        nb: &mut Notebook,
        state: &mut RunState,
        cs: &mut CellState,
        cell_deadline: Option<tokio::time::Instant>,
        run_deadline: Option<tokio::time::Instant>,
        cancel: &CancellationToken,
    ) -> Option<Stop> {
        let mut iopub_deadline: Option<tokio::time::Instant> = None;
        loop {
            if cs.reply.is_some() && cs.idle {
                return None;
            }
            if cs.reply.is_some() && iopub_deadline.is_none() {
                iopub_deadline = Some(tokio::time::Instant::now() + self.config.iopub_timeout);
            }
            tokio::select! {
                biased;
                ev = kernel.client.next_event() => match ev {
                    Some(ClientEvent::Message(Channel::IoPub, msg)) => {
                        if msg.parent_msg_id() == Some(cs.msg_id.as_str()) {
                            let mut msg = msg;
                            self.process_iopub(nb, state, cs, &mut msg);
                        }
                    }
                    Some(ClientEvent::Message(Channel::Shell, msg)) => {
                        if msg.parent_msg_id() == Some(cs.msg_id.as_str())
                            && msg.msg_type() == "execute_reply"
                        {
                            if self.config.record_timing {
                                set_timing(&mut nb.cells[cs.index], "shell.execute_reply", &msg);
                            }
                            cs.reply = Some(*msg);
                        }
                    }
                    Some(ClientEvent::Message(Channel::Control, _)) => {}
                    Some(ClientEvent::Closed(ch, e)) => {
                        return Some(self.closed(kernel, format!("{ch:?} channel closed: {e}")).await);
                    }
                    None => return Some(self.closed(kernel, "kernel channels closed".into()).await),
                },
                exit = kernel.process.exited() => return Some(Stop::Died(exit)),
                _ = cancel.cancelled() => return Some(Stop::Cancelled),
                _ = sleep_until_opt(cell_deadline) => return Some(Stop::Deadline { cell: true }),
                _ = sleep_until_opt(run_deadline) => return Some(Stop::Deadline { cell: false }),
                _ = sleep_until_opt(iopub_deadline) => {
                    tracing::warn!(cell = cs.index, "timeout waiting for IOPub output");
                    return None;
                }
            }
        }
    }

    /// A channel closed: if the process is exiting, report death, else a transport error.
    async fn closed(&self, kernel: &Kernel, why: String) -> Stop {
        match tokio::time::timeout(Duration::from_secs(2), kernel.process.exited()).await {
            Ok(exit) => Stop::Died(exit),
            Err(_) => Stop::Transport(why),
        }
    }

    /// nbclient `process_message` + `output` + `clear_output` for one iopub message.
    fn process_iopub(
        &self,
        nb: &mut Notebook,
        state: &mut RunState,
        cs: &mut CellState,
        msg: &mut Message,
    ) {
        let msg_type = msg.msg_type().to_owned();
        let msg_type = msg_type.as_str();
        let content = &msg.content;
        let display_id = content
            .get("transient")
            .and_then(|t| t.get("display_id"))
            .and_then(Value::as_str)
            .map(str::to_string);

        if let Some(id) = &display_id {
            if matches!(
                msg_type,
                "execute_result" | "display_data" | "update_display_data"
            ) {
                self.update_display(nb, state, cs, id, content);
            }
        }
        if let Some(count) = content.get("execution_count").and_then(Value::as_i64) {
            nb.cells[cs.index].execution_count = Some(count);
        }
        match msg_type {
            "status" => {
                let st = content.get("execution_state").and_then(Value::as_str);
                if self.config.record_timing {
                    match st {
                        Some("idle") => {
                            set_timing(&mut nb.cells[cs.index], "iopub.status.idle", msg)
                        }
                        Some("busy") => {
                            set_timing(&mut nb.cells[cs.index], "iopub.status.busy", msg)
                        }
                        _ => {}
                    }
                }
                if st == Some("idle") {
                    cs.idle = true;
                }
            }
            "execute_input" => {
                if self.config.record_timing {
                    set_timing(&mut nb.cells[cs.index], "iopub.execute_input", msg);
                }
            }
            "clear_output" => {
                if content
                    .get("wait")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
                {
                    cs.clear_before_next = true;
                } else {
                    clear_cell(nb, state, cs);
                }
            }
            "update_display_data" => {}
            t if t.starts_with("comm") => {}
            _ => {
                // A stream's text is moved, not copied: it can be as large as the
                // message limit (kernel/client.rs MAX_CONTENT_BYTES).
                let out = if msg_type == "stream" {
                    Some(stream_output(std::mem::take(&mut msg.content)))
                } else {
                    output_from_msg(msg_type, content)
                };
                if let Some(out) = out {
                    if cs.clear_before_next {
                        clear_cell(nb, state, cs);
                        cs.clear_before_next = false;
                    }
                    self.append_output(nb, state, cs, out, display_id);
                }
            }
        }
    }

    fn update_display(
        &self,
        nb: &mut Notebook,
        state: &RunState,
        cs: &mut CellState,
        display_id: &str,
        content: &Value,
    ) {
        let Some(cells) = state.display_map.get(display_id) else {
            return;
        };
        let data = content.get("data").cloned().unwrap_or_else(|| json!({}));
        let metadata = content
            .get("metadata")
            .cloned()
            .unwrap_or_else(|| json!({}));
        let size = value_bytes(&data);
        for (&cell_idx, indices) in cells {
            let Some(cell) = nb.cells.get_mut(cell_idx) else {
                continue;
            };
            for &i in indices {
                let Some(Value::Object(out)) = cell.outputs.get_mut(i) else {
                    continue;
                };
                if cell_idx == cs.index {
                    let old = out.get("data").map(value_bytes).unwrap_or(0);
                    let new_bytes = cs.bytes.saturating_sub(old) + size;
                    if new_bytes > self.config.max_cell_output_bytes
                        || state.total_bytes + new_bytes > self.config.max_total_output_bytes
                    {
                        cs.truncated = true;
                        continue;
                    }
                    cs.bytes = new_bytes;
                }
                out.insert("data".into(), data.clone());
                out.insert("metadata".into(), metadata.clone());
            }
        }
    }

    fn append_output(
        &self,
        nb: &mut Notebook,
        state: &mut RunState,
        cs: &mut CellState,
        mut out: Value,
        display_id: Option<String>,
    ) {
        let is_error = out.get("output_type").and_then(Value::as_str) == Some("error");
        let size = output_bytes(&out);
        let budget = self
            .config
            .max_cell_output_bytes
            .saturating_sub(cs.bytes)
            .min(
                self.config
                    .max_total_output_bytes
                    .saturating_sub(state.total_bytes + cs.bytes),
            );
        // Error outputs are the record of what went wrong: always kept (bounded separately).
        if !is_error && (cs.truncated || size > budget) {
            if !cs.truncated {
                // Keep what fits of a stream, then the marker once; drop everything after.
                if let Some(Value::String(text)) = out.get_mut("text") {
                    if budget > 0 {
                        let cut = floor_char_boundary(text, budget);
                        text.truncate(cut);
                        // give back what was cut (a message can be 16 MiB)
                        text.shrink_to_fit();
                        cs.bytes += cut;
                        push_output(nb, cs, out, self.config.stream_merge);
                    }
                }
                cs.truncated = true;
                let limit = if self.config.max_cell_output_bytes.saturating_sub(cs.bytes)
                    <= self
                        .config
                        .max_total_output_bytes
                        .saturating_sub(state.total_bytes + cs.bytes)
                {
                    format!("{} bytes of cell output", self.config.max_cell_output_bytes)
                } else {
                    format!(
                        "{} bytes of notebook output",
                        self.config.max_total_output_bytes
                    )
                };
                let marker = json!({
                    "output_type": "stream",
                    "name": "stderr",
                    "text": format!("\n... [om-worker: output truncated after {limit}; further output of this cell dropped]\n"),
                });
                push_output(nb, cs, marker, StreamMerge::None);
            }
            return;
        }
        if is_error {
            cap_error(&mut out, 1024 * 1024);
        }
        cs.bytes += output_bytes(&out);
        if let Some(id) = display_id {
            let pos = nb.cells[cs.index].outputs.len();
            state
                .display_map
                .entry(id)
                .or_default()
                .entry(cs.index)
                .or_default()
                .push(pos);
        }
        push_output(nb, cs, out, self.config.stream_merge);
    }
}

fn push_output(nb: &mut Notebook, cs: &CellState, out: Value, merge: StreamMerge) {
    let outputs = &mut nb.cells[cs.index].outputs;
    if merge == StreamMerge::Consecutive {
        if let (Some(Value::String(name)), Some(Value::String(text))) =
            (out.get("name"), out.get("text"))
        {
            if out.get("output_type").and_then(Value::as_str) == Some("stream") {
                if let Some(Value::Object(last)) = outputs.last_mut() {
                    if last.get("output_type").and_then(Value::as_str) == Some("stream")
                        && last.get("name").and_then(Value::as_str) == Some(name.as_str())
                    {
                        if let Some(Value::String(prev)) = last.get_mut("text") {
                            prev.push_str(text);
                            return;
                        }
                    }
                }
            }
        }
    }
    outputs.push(out);
}

fn clear_cell(nb: &mut Notebook, state: &mut RunState, cs: &mut CellState) {
    nb.cells[cs.index].outputs.clear();
    cs.bytes = 0;
    for cells in state.display_map.values_mut() {
        if let Some(v) = cells.get_mut(&cs.index) {
            v.clear();
        }
    }
}

fn emit(opts: &RunOptions, p: Progress) {
    if let Some(tx) = &opts.progress {
        let _ = tx.send(p);
    }
}

/// `now + d`, or no deadline at all when that is past what an `Instant` can hold: a timeout
/// comes from a message (`timeout=1e308`) and must never overflow into a panic.
fn deadline_after(d: Duration) -> Option<tokio::time::Instant> {
    tokio::time::Instant::now().checked_add(d)
}

/// Seconds from outside (a message, a notebook's metadata) as a timeout: positive and finite,
/// clamped to [`MAX_TIMEOUT`] (larger values mean "no practical limit" and would otherwise
/// overflow `Duration`/`Instant` arithmetic). `None` for anything else.
pub fn timeout_from_secs(secs: f64) -> Option<Duration> {
    if !(secs > 0.0 && secs.is_finite()) {
        return None;
    }
    Some(
        Duration::try_from_secs_f64(secs)
            .unwrap_or(MAX_TIMEOUT)
            .min(MAX_TIMEOUT),
    )
}

/// The longest timeout taken from input: one year (beyond any worker's time limit).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn set_timing(cell: &mut Cell, key: &str, msg: &Message) {
    let ts = Value::String(msg.nbclient_timestamp());
    match cell.metadata.get_mut("execution") {
        Some(Value::Object(m)) => {
            m.insert(key.into(), ts);
        }
        _ => {
            let mut m = Map::new();
            m.insert(key.into(), ts);
            cell.metadata.insert("execution".into(), Value::Object(m));
        }
    }
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// [`output_from_msg`] for a `stream` message, moving its text out of `content`.
fn stream_output(mut content: Value) -> Value {
    let name = str_field(&content, "name").unwrap_or("stdout").to_owned();
    let text = match content.get_mut("text").map(Value::take) {
        Some(Value::String(s)) => s,
        _ => String::new(),
    };
    json!({"output_type": "stream", "name": name, "text": text})
}

/// `nbformat.v4.output_from_msg` with nbformat's `new_output` defaults for missing fields;
/// `None` for message types that are not outputs.
fn output_from_msg(msg_type: &str, content: &Value) -> Option<Value> {
    let obj = |key: &str| match content.get(key) {
        Some(Value::Object(m)) => Value::Object(m.clone()),
        _ => Value::Object(Map::new()),
    };
    match msg_type {
        "execute_result" => Some(json!({
            "output_type": "execute_result",
            "metadata": obj("metadata"),
            "data": obj("data"),
            "execution_count": content.get("execution_count").and_then(Value::as_i64),
        })),
        "stream" => Some(json!({
            "output_type": "stream",
            "name": str_field(content, "name").unwrap_or("stdout"),
            "text": str_field(content, "text").unwrap_or(""),
        })),
        "display_data" => Some(json!({
            "output_type": "display_data",
            "metadata": obj("metadata"),
            "data": obj("data"),
        })),
        "error" => {
            let traceback: Vec<Value> = match content.get("traceback") {
                Some(Value::Array(tb)) => tb.iter().filter(|v| v.is_string()).cloned().collect(),
                _ => Vec::new(),
            };
            Some(json!({
                "output_type": "error",
                "ename": str_field(content, "ename").unwrap_or("NotImplementedError"),
                "evalue": str_field(content, "evalue").unwrap_or(""),
                "traceback": traceback,
            }))
        }
        _ => None,
    }
}

/// Approximate retained size of a JSON value (string bytes dominate outputs).
fn value_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().map(value_bytes).sum::<usize>() + a.len(),
        Value::Object(m) => m.iter().map(|(k, v)| k.len() + value_bytes(v)).sum(),
        _ => 8,
    }
}

fn output_bytes(out: &Value) -> usize {
    match out.get("output_type").and_then(Value::as_str) {
        Some("stream") => out.get("text").map(value_bytes).unwrap_or(0),
        _ => value_bytes(out),
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    if i >= s.len() {
        return s.len();
    }
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Bounds a (pathological) error output: evalue and traceback lines share `limit` bytes.
fn cap_error(out: &mut Value, limit: usize) {
    if output_bytes(out) <= limit {
        return;
    }
    if let Some(Value::String(ev)) = out.get_mut("evalue") {
        let cut = floor_char_boundary(ev, limit / 2);
        ev.truncate(cut);
    }
    if let Some(Value::Array(tb)) = out.get_mut("traceback") {
        let mut left = limit / 2;
        tb.retain_mut(|line| {
            if let Value::String(s) = line {
                if s.len() > left {
                    let cut = floor_char_boundary(s, left);
                    s.truncate(cut);
                }
                left -= s.len();
            }
            left > 0
        });
        tb.push(Value::String("... [om-worker: traceback truncated]".into()));
    }
}

/// `str(CellExecutionError.from_cell_and_msg(cell, reply))` from nbclient.
fn cell_error_message(cell: &Cell, traceback: &[String], ename: &str, evalue: &str) -> String {
    let mut streams: Vec<String> = cell
        .outputs
        .iter()
        .filter(|o| o.get("output_type").and_then(Value::as_str) == Some("stream"))
        .map(|o| {
            format!(
                "----- {} -----\n{}",
                str_field(o, "name").unwrap_or(""),
                str_field(o, "text").unwrap_or("").trim_end()
            )
        })
        .collect();
    if !streams.is_empty() {
        streams.insert(0, String::new());
        streams.push("------------------".into());
    }
    let msg = format!(
        "An error occurred while executing the following cell:\n------------------\n{}\n------------------\n{}\n{}\n",
        cell.source,
        streams.join("\n"),
        traceback.join("\n")
    );
    if msg.is_empty() {
        format!("{ename}: {evalue}")
    } else {
        msg
    }
}

/// nbclient's `CellTimeoutError` text.
fn timeout_message(cell: &Cell, timeout: Duration) -> String {
    let lines: Vec<&str> = cell.source.trim().split('\n').collect();
    let src = if cell.source.is_empty() {
        "Cell contents not found.".to_string()
    } else if lines.len() < 11 {
        cell.source.clone()
    } else {
        // nbclient formats the Python lists here; mirror their repr loosely.
        format!("{:?}\n...\n{:?}", &lines[..5], &lines[lines.len() - 5..])
    };
    format!(
        "A cell timed out while it was being executed, after {} seconds.\nThe message was: Cell execution timed out.\nHere is a preview of the cell contents:\n-------------------\n{}\n-------------------\n",
        timeout.as_secs(),
        src
    )
}

/// nbclient `coalesce_streams=True` post-processing.
fn coalesce_streams(outputs: &mut Vec<Value>) {
    let mut new_outputs: Vec<Value> = Vec::with_capacity(outputs.len());
    let mut first_of: HashMap<String, usize> = HashMap::new();
    for out in outputs.drain(..) {
        let is_stream = out.get("output_type").and_then(Value::as_str) == Some("stream");
        let name = str_field(&out, "name").map(str::to_string);
        match (is_stream, name) {
            (true, Some(name)) => {
                if let Some(&i) = first_of.get(&name) {
                    let text = str_field(&out, "text").unwrap_or("").to_string();
                    if let Some(Value::String(prev)) = new_outputs[i].get_mut("text") {
                        prev.push_str(&text);
                    }
                } else {
                    first_of.insert(name, new_outputs.len());
                    new_outputs.push(out);
                }
            }
            _ => new_outputs.push(out),
        }
    }
    for &i in first_of.values() {
        if let Some(Value::String(text)) = new_outputs[i].get_mut("text") {
            *text = carriage_return(&backspace(text));
        }
    }
    let mut i = 0;
    while i + 1 < new_outputs.len() {
        let is = |v: &Value, n: &str| {
            v.get("output_type").and_then(Value::as_str) == Some("stream")
                && str_field(v, "name") == Some(n)
        };
        if is(&new_outputs[i], "stderr") && is(&new_outputs[i + 1], "stdout") {
            new_outputs.swap(i, i + 1);
        }
        i += 1;
    }
    *outputs = new_outputs;
}

/// Repeatedly removes `[^\n]\b` (nbclient `_RGX_BACKSPACE`).
fn backspace(s: &str) -> String {
    let mut cur: Vec<char> = s.chars().collect();
    loop {
        let mut out = Vec::with_capacity(cur.len());
        let mut i = 0;
        while i < cur.len() {
            if i + 1 < cur.len() && cur[i] != '\n' && cur[i + 1] == '\u{8}' {
                i += 2;
            } else {
                out.push(cur[i]);
                i += 1;
            }
        }
        if out.len() == cur.len() {
            return out.into_iter().collect();
        }
        cur = out;
    }
}

/// Removes `.*\r(?=[^\n])` per line (nbclient `_RGX_CARRIAGERETURN`).
fn carriage_return(s: &str) -> String {
    let mut result = String::with_capacity(s.len());
    for segment in s.split_inclusive('\n') {
        let content = segment.strip_suffix('\n').unwrap_or(segment);
        let has_nl = content.len() != segment.len();
        // last '\r' that is followed by another character of this line
        let cut = content
            .char_indices()
            .filter(|&(i, c)| c == '\r' && i + 1 < content.len())
            .map(|(i, _)| i + 1)
            .next_back();
        match cut {
            Some(c) => result.push_str(&content[c..]),
            None => result.push_str(content),
        }
        if has_nl {
            result.push('\n');
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cr_and_backspace_like_nbclient() {
        assert_eq!(carriage_return("a\rb\rc"), "c");
        assert_eq!(carriage_return("a\rb\r"), "b\r");
        assert_eq!(carriage_return("10%\r50%\n100%\r\n"), "50%\n100%\r\n");
        assert_eq!(backspace("abc\u{8}\u{8}d"), "ad");
        assert_eq!(backspace("\n\u{8}x"), "\n\u{8}x");
    }

    #[test]
    fn coalesce_merges_and_orders() {
        let mut outs = vec![
            json!({"output_type":"stream","name":"stderr","text":"e1"}),
            json!({"output_type":"stream","name":"stdout","text":"o1"}),
            json!({"output_type":"display_data","data":{},"metadata":{}}),
            json!({"output_type":"stream","name":"stdout","text":"o2"}),
        ];
        coalesce_streams(&mut outs);
        assert_eq!(outs.len(), 3);
        assert_eq!(outs[0]["name"], "stdout");
        assert_eq!(outs[0]["text"], "o1o2");
        assert_eq!(outs[1]["name"], "stderr");
    }

    #[test]
    fn outputs_from_malformed_content() {
        let o = output_from_msg("error", &json!({"traceback": [1, "x"]})).expect("error output");
        assert_eq!(o["ename"], "NotImplementedError");
        assert_eq!(o["traceback"], json!(["x"]));
        assert!(output_from_msg("status", &json!({})).is_none());
        let s = output_from_msg("stream", &json!(null)).expect("stream");
        assert_eq!(s["text"], "");
    }
}
