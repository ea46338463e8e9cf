//! Every other omega|ml task (`omegaml.tasks.omega_fit`, `omega_predict`, …,
//! `omegaml.backends.package.tasks.run_omega_script`, …): run by omega|ml's
//! own task function in a fresh Python child, one per task.
//!
//! Why a child and not a port: these tasks are omega|ml's model, script and
//! genai code paths (scikit-learn, keras, user packages); only omega|ml's
//! Python can run them faithfully. What om-worker keeps for itself is
//! everything around the call:
//!
//! - **The message is never unpickled in Python.** The worker has decoded it
//!   with its allow-list decoder; the child gets the arguments as typed JSON
//!   (`protocol::typed_json`) in a private request file and rebuilds them as
//!   data (`python/om_taskrunner.py`).
//! - **One fresh child per task**, forked from the fork server (omega|ml and
//!   its frameworks already imported, so a task does not pay ~3 CPU-s of
//!   imports as under omega|ml's `--max-tasks-per-child 1`), in its own
//!   session, with the kernels' environment, the task slot's GPU and the
//!   per-task memory limit. Nothing is reused between tasks. Without a fork
//!   server the runner is started as a plain process (slower, same result).
//! - **The child serializes its return value itself** with the worker's
//!   result serializer; the worker relays those bytes (`Output::Serialized`)
//!   without decoding them. Exceptions come back as type, module, arguments
//!   and traceback, and are stored as a Python worker stores them.
//! - **The result goes out when the outcome is written**, not when the child
//!   has exited: the child writes a byte to a FIFO in its directory after
//!   `outcome.json`; the worker reads the outcome and reports it while the
//!   child's tree is ended (a process with omega|ml and its frameworks mapped
//!   takes milliseconds to tear down), and frees the slot once it is gone
//!   ([`super::Teardown`]: a GPU's next task never meets the last one's
//!   process).
//! - **A child that dies** (segfault, OOM kill, `os._exit`) is a FAILURE with
//!   Celery's `WorkerLostError`; cancellation (time limits, revoke with
//!   terminate, shutdown) ends its whole process group.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;
use tracing::{debug, info, warn};

use super::{
    gpu_env_for_slot, CancelReason, ErrorKind, Output, Task, TaskContext, TaskError, TaskSource,
};
use crate::kernel::{ForkServerLauncher, KernelExit, KernelProcess, KernelTracker};
use crate::protocol::result::SerializedValue;
use crate::protocol::typed_json::{from_typed_json, to_typed_json};
use crate::protocol::{ExceptionInfo, Serializer, TaskMessage, Value};

/// What every Python task shares: how to start a child and what it gets.
pub struct PythonRuntime {
    /// The fork server (None: `--no-fork-server`, children are plain processes).
    pub fork_server: Option<Arc<ForkServerLauncher>>,
    /// The kernel Python (plain-process children).
    pub python: PathBuf,
    /// Environment of plain-process children (the fork server's own otherwise).
    pub env: BTreeMap<String, String>,
    /// Working directory of plain-process children (`OMEGA_TMP`).
    pub cwd: PathBuf,
    /// The worker's result serializer: the child writes results with it.
    pub serializer: Serializer,
    /// Address-space limit per child (`--kernel-memory-mb`).
    pub memory_limit_bytes: Option<u64>,
    /// Registers plain-process children for the shutdown sweep.
    pub kernels: KernelTracker,
    /// `om_taskrunner.py` for plain-process children and listing, written
    /// once into a private directory of this process (no other worker's
    /// version, no half-written file).
    runner: OnceLock<Result<(crate::kernel::launcher::RuntimeDir, PathBuf), String>>,
}

impl PythonRuntime {
    /// A runtime; see the fields.
    pub fn new(
        fork_server: Option<Arc<ForkServerLauncher>>,
        python: PathBuf,
        env: BTreeMap<String, String>,
        cwd: PathBuf,
        serializer: Serializer,
        memory_limit_bytes: Option<u64>,
        kernels: KernelTracker,
    ) -> Self {
        PythonRuntime {
            fork_server,
            python,
            env,
            cwd,
            serializer,
            memory_limit_bytes,
            kernels,
            runner: OnceLock::new(),
        }
    }

    /// Whether the tasks' environment names omega|ml's default queue
    /// (`OMEGA_WORKER_LABEL`, else `CELERY_Q`, as `omegaml.defaults` reads it).
    fn label_configured(&self) -> bool {
        ["OMEGA_WORKER_LABEL", "CELERY_Q"]
            .iter()
            .any(|k| self.env.get(*k).is_some_and(|v| !v.is_empty()))
    }

    /// The path of `om_taskrunner.py` for plain processes (written on first use).
    fn runner_script(&self) -> Result<PathBuf, String> {
        self.runner
            .get_or_init(|| {
                let dir = crate::kernel::launcher::RuntimeDir::create()
                    .map_err(|e| format!("cannot create a directory for the task runner: {e}"))?;
                let path = dir.0.join("om_taskrunner.py");
                std::fs::write(&path, crate::kernel::forkserver::TASKRUNNER_SCRIPT)
                    .map_err(|e| format!("cannot write the task runner: {e}"))?;
                Ok((dir, path))
            })
            .as_ref()
            .map(|(_, path)| path.clone())
            .map_err(Clone::clone)
    }
}

/// What a task child of slot `slot` gets on top of the kernels' environment:
/// its GPU (`CUDA_VISIBLE_DEVICES`), if GPUs are assigned.
pub fn slot_env(gpus: &[String], slot: usize) -> BTreeMap<String, String> {
    gpu_env_for_slot(gpus, slot)
        .map(|gpu| ("CUDA_VISIBLE_DEVICES".to_owned(), gpu))
        .into_iter()
        .collect()
}

/// One omega|ml task name run in a Python child.
pub struct PythonTask {
    name: &'static str,
    runtime: Arc<PythonRuntime>,
}

impl PythonTask {
    /// The task `name` (as omega|ml's Celery app registers it). Names are
    /// leaked once at start-up: the registry keys by `&'static str`, and a
    /// worker registers a fixed, small set.
    pub fn new(name: &str, runtime: Arc<PythonRuntime>) -> Self {
        PythonTask {
            name: Box::leak(name.to_owned().into_boxed_str()),
            runtime,
        }
    }
}

/// The FIFO `done` in the task's directory, opened read-write (so it never
/// reads end-of-file): the child writes one byte to it after `outcome.json`
/// is in place (`done_fifo` in the request).
struct DoneSignal {
    path: PathBuf,
    fifo: tokio::net::unix::pipe::Receiver,
}

impl DoneSignal {
    fn create(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join("done");
        nix::unistd::mkfifo(
            &path,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .map_err(std::io::Error::from)?;
        let fifo = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(&path)?;
        Ok(DoneSignal { path, fifo })
    }

    /// True once the child has written to the FIFO, false if it cannot be
    /// watched; never returns without a signal (`None`: nothing to wait for).
    async fn wait(done: Option<&DoneSignal>) -> bool {
        let Some(done) = done else {
            return std::future::pending().await;
        };
        loop {
            if done.fifo.readable().await.is_err() {
                return false;
            }
            match done.fifo.try_read(&mut [0u8; 1]) {
                Ok(n) => return n > 0,
                // readiness can be a false positive
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return false,
            }
        }
    }
}

/// `outcome.json`, written last by the child (see `python/om_taskrunner.py`).
#[derive(Debug, Deserialize)]
struct Outcome {
    status: String,
    #[serde(default)]
    exc_type: Option<String>,
    #[serde(default)]
    exc_module: Option<String>,
    #[serde(default)]
    exc_message: Option<serde_json::Value>,
    #[serde(default)]
    traceback: Option<String>,
    #[serde(default)]
    repr: Option<String>,
    /// What `self.retry()` republished (only logged).
    #[serde(default)]
    retry: Option<serde_json::Value>,
    /// Task messages the task published, `[[name, routing key, count], ...]`, counted as
    /// `celery_task_sent_total`; read leniently (a bad entry is skipped, not an error).
    #[serde(default)]
    sent: Option<serde_json::Value>,
}

/// The `sent` entries of an outcome that are well-formed: `(name, queue, count)`.
fn sent_tasks(sent: Option<&serde_json::Value>) -> Vec<(String, String, u64)> {
    let Some(serde_json::Value::Array(items)) = sent else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| match item.as_array().map(Vec::as_slice) {
            Some([name, queue, n]) => Some((
                name.as_str()?.to_owned(),
                queue.as_str()?.to_owned(),
                n.as_u64()?,
            )),
            _ => None,
        })
        .collect()
}

#[async_trait]
impl Task for PythonTask {
    fn name(&self) -> &'static str {
        self.name
    }

    /// Celery's tracer in the child publishes callbacks and the next chain
    /// element; its backend counts chord parts and calls errbacks.
    fn runs_canvas(&self) -> bool {
        true
    }

    async fn run(&self, ctx: TaskContext, msg: &TaskMessage) -> Result<Output, TaskError> {
        let rt = &self.runtime;
        // Private (0700), removed when dropped, swept at start-up if a crash left it.
        let dir = crate::kernel::launcher::RuntimeDir::create()
            .map_err(|e| internal(format!("cannot create the task's directory: {e}")))?;
        let dir_path = dir.0.clone();
        let request_path = dir_path.join("request.json");
        let mut request = request_json(msg, &ctx, rt.serializer, &dir_path);
        // Without it the result waits for the child's exit (still correct).
        let mut done = match DoneSignal::create(&dir_path) {
            Ok(done) => {
                request["done_fifo"] = json!(done.path);
                Some(done)
            }
            Err(e) => {
                debug!("no done signal for the task child ({e}); waiting for its exit");
                None
            }
        };
        if !rt.label_configured() {
            // No OMEGA_WORKER_LABEL/CELERY_Q for omega|ml's app: what the task
            // publishes (the next chain element, callbacks, a retry without a
            // routing key) goes to the queue this message came from, not to
            // omega|ml's `default` (where a Python worker would send it).
            request["default_queue"] = json!(ctx.delivery.routing_key);
        }
        std::fs::write(&request_path, request.to_string())
            .map_err(|e| internal(format!("cannot write the task request: {e}")))?;
        let extra_env = slot_env(&ctx.gpus, ctx.slot);
        let child = self.start(&request_path, &extra_env, &ctx.nodename).await?;
        debug!(task_id = %msg.id, pid = child.pid(), "task child started");
        // The soft time limit is Celery's: the child arms it itself when the
        // task starts (the request carries it) and raises
        // `SoftTimeLimitExceeded` inside the task, which may clean up or even
        // return, as in a Celery pool process. So the worker's own soft timer
        // is not acted on here; the hard limit (the worker drops this future,
        // which kills the group) still bounds the run. Any other
        // cancellation (revoke with terminate, shutdown) ends it now.
        let mut soft_reached = false;
        let exit = loop {
            tokio::select! {
                exit = child.exited() => break exit,
                signalled = DoneSignal::wait(done.as_ref()) => {
                    done = None;
                    if signalled && dir_path.join("outcome.json").exists() {
                        // The child is in its final `os._exit`: the result
                        // goes out now; its slot is free once its tree is gone.
                        ctx.teardown.defer(async move { child.kill().await });
                        return read_outcome(&dir_path, KernelExit::Code(0), rt.serializer);
                    }
                }
                _ = ctx.cancel.cancelled(), if !soft_reached => {
                    if ctx.cancelled_because() == Some(CancelReason::SoftTimeLimit) {
                        soft_reached = true;
                        continue;
                    }
                    child.kill().await;
                    return Err(cancelled(&ctx));
                }
            }
        };
        // Whatever it started in its session ends with it.
        child.kill().await;
        read_outcome(&dir_path, exit, rt.serializer)
    }
}

impl PythonTask {
    /// Forks the child from the server, else starts the runner as a plain process.
    async fn start(
        &self,
        request: &Path,
        extra_env: &BTreeMap<String, String>,
        hostname: &str,
    ) -> Result<KernelProcess, TaskError> {
        let rt = &self.runtime;
        if let Some(fs) = &rt.fork_server {
            match fs
                .fork_task_warm(request, extra_env, rt.memory_limit_bytes, hostname)
                .await
            {
                Ok(child) => return Ok(child),
                Err(e) => warn!("fork server cannot run the task ({e}); starting a plain process"),
            }
        }
        let script = rt.runner_script().map_err(internal)?;
        let mut argv = vec![
            rt.python.to_string_lossy().into_owned(),
            script.to_string_lossy().into_owned(),
            request.to_string_lossy().into_owned(),
        ];
        if let Some(limit) = rt.memory_limit_bytes {
            argv = crate::kernel::launcher::wrap_memory_limit(argv, limit, &rt.python);
        }
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .envs(&rt.env)
            .envs(extra_env)
            .current_dir(&rt.cwd)
            .stdin(std::process::Stdio::null())
            // logged line by line, escaped (crate::logging::forward_child_stderr)
            .stderr(std::process::Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| internal(format!("cannot start {}: {e}", rt.python.display())))?;
        if let Some(stderr) = child.stderr.take() {
            let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
            crate::logging::forward_child_stderr(stderr, "task stderr", pid);
        }
        KernelProcess::adopt(child, &rt.kernels)
            .map_err(|e| internal(format!("cannot track the task process: {e}")))
    }
}

/// The request file: the task, its arguments as typed JSON, Celery's request
/// fields, the serializer and where to write the outcome.
fn request_json(
    msg: &TaskMessage,
    ctx: &TaskContext,
    serializer: Serializer,
    result_dir: &Path,
) -> serde_json::Value {
    let kwargs = Value::Dict(
        msg.kwargs
            .iter()
            .map(|(k, v)| (Value::Str(k.clone()), v.clone()))
            .collect(),
    );
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| t.to_rfc3339());
    // The canvas as the message's embed holds it (signatures as data objects).
    let canvas = |key: &str| match msg.embed.get(key) {
        None | Some(Value::None) => serde_json::Value::Null,
        Some(v) => to_typed_json(v),
    };
    json!({
        "task": msg.name,
        "id": msg.id,
        "args": to_typed_json(&Value::List(msg.args.clone())),
        "kwargs": to_typed_json(&kwargs),
        "request": {
            "retries": msg.retries,
            "hostname": ctx.nodename,
            "delivery_info": {
                "exchange": ctx.delivery.exchange,
                "routing_key": ctx.delivery.routing_key,
                "priority": ctx.delivery.priority,
                "redelivered": ctx.delivery.redelivered,
            },
            "reply_to": msg.reply_to,
            "correlation_id": msg.id,
            "root_id": msg.root_id,
            "parent_id": msg.parent_id,
            "group": msg.group,
            "group_index": msg.group_index,
            "eta": time(msg.eta),
            "expires": time(msg.expires),
            // The message's limits, as Celery's request holds them (a retry passes them on).
            "timelimit": [msg.hard_time_limit, msg.soft_time_limit],
            "origin": msg.origin,
            "ignore_result": msg.ignore_result.unwrap_or(false),
        },
        "callbacks": canvas("callbacks"),
        "errbacks": canvas("errbacks"),
        "chain": canvas("chain"),
        "chord": canvas("chord"),
        // The soft limit when neither the message nor the task sets one (the worker's).
        "soft_time_limit": ctx.soft_time_limit,
        "result_serializer": serializer.as_str(),
        "result_dir": result_dir.to_string_lossy(),
    })
}

/// Turns what the child left (and how it ended) into the task's outcome.
fn read_outcome(dir: &Path, exit: KernelExit, serializer: Serializer) -> Result<Output, TaskError> {
    let outcome = match std::fs::read(dir.join("outcome.json")) {
        Ok(bytes) => serde_json::from_slice::<Outcome>(&bytes)
            .map_err(|e| internal(format!("unreadable task outcome: {e}")))?,
        // No outcome: the child died before it could write one.
        Err(_) => return Err(worker_lost(exit)),
    };
    for (name, queue, n) in sent_tasks(outcome.sent.as_ref()) {
        let name = crate::telemetry::foreign_name(&name);
        crate::telemetry::celery_task_sent(&name, &queue, n);
    }
    match outcome.status.as_str() {
        "SUCCESS" => {
            let bytes = std::fs::read(dir.join("result.bin"))
                .map_err(|e| internal(format!("task result missing: {e}")))?;
            Ok(Output::Serialized(SerializedValue {
                serializer,
                bytes,
                repr: outcome.repr.unwrap_or_else(|| "<result>".into()),
            }))
        }
        status @ ("FAILURE" | "RETRY" | "REJECTED" | "IGNORED") => {
            let kind = match status {
                "RETRY" => ErrorKind::Retry,
                "REJECTED" => ErrorKind::Rejected,
                "IGNORED" => ErrorKind::Ignored,
                _ => ErrorKind::Failure,
            };
            if let Some(retry) = &outcome.retry {
                // Not the whole record: new kwargs may hold omega|ml's `__auth`.
                let field = |k: &str| retry.get(k).cloned().unwrap_or_default();
                info!(
                    retries = %field("retries"), countdown = %field("countdown"),
                    eta = %field("eta"), queue = %field("queue"),
                    "the task republished itself for a retry"
                );
            }
            let exc_message = match outcome.exc_message.as_ref().map(from_typed_json) {
                Some(Ok(Value::List(args))) | Some(Ok(Value::Tuple(args))) => args,
                Some(Ok(other)) => vec![other],
                Some(Err(e)) => vec![Value::Str(format!("<unreadable exception arguments: {e}>"))],
                None => Vec::new(),
            };
            Err(TaskError {
                exception: ExceptionInfo {
                    exc_type: outcome.exc_type.unwrap_or_else(|| "Exception".into()),
                    exc_module: outcome.exc_module.unwrap_or_else(|| "builtins".into()),
                    exc_message,
                },
                traceback: outcome.traceback,
                kind,
            })
        }
        other => Err(internal(format!("unknown task outcome status {other:?}"))),
    }
}

/// Celery's `WorkerLostError` for a child that ended without an outcome,
/// with billiard's wording.
fn worker_lost(exit: KernelExit) -> TaskError {
    let how = match exit {
        KernelExit::Signal(s) => {
            let name = nix::sys::signal::Signal::try_from(s)
                .map(|sig| format!(" ({})", sig.as_str()))
                .unwrap_or_default();
            format!("signal {s}{name}")
        }
        KernelExit::Code(c) => format!("exitcode {c}"),
        other => format!("{other:?}"),
    };
    TaskError::new(
        "billiard.exceptions",
        "WorkerLostError",
        format!("Worker exited prematurely: {how} Job: 0."),
    )
}

fn internal(message: String) -> TaskError {
    TaskError::new("om_worker.errors", "WorkerInternalError", message)
}

/// The error a cancelled run reports, by why it was cancelled.
fn cancelled(ctx: &TaskContext) -> TaskError {
    match ctx.cancelled_because() {
        Some(CancelReason::Revoked) => {
            TaskError::new("celery.exceptions", "TaskRevokedError", "terminated")
        }
        _ => TaskError::new(
            "celery.exceptions",
            "WorkerShutdown",
            "interrupted by worker shutdown",
        ),
    }
}

/// The Python tasks omega|ml's Celery app registers in the kernel Python, as
/// that app lists them (`om_taskrunner.py --list-tasks`), minus the ones
/// om-worker implements itself. Listed on first use (a failed listing is
/// retried later, not cached); a Python without omega|ml lists none, so its
/// names stay `NotRegistered`, as before.
pub struct PythonCatalog {
    runtime: Arc<PythonRuntime>,
    native: HashSet<String>,
    listing: tokio::sync::Mutex<Listing>,
}

/// Where listing the Python tasks stands.
enum Listing {
    NotYet,
    /// Failed then (a fork server that could not start, MongoDB away at
    /// omega|ml's setup): tried again after [`RETRY_LISTING`], not cached.
    Failed(std::time::Instant),
    Loaded(Arc<HashMap<String, Arc<dyn Task>>>),
}

/// How long listing the tasks may take (a cold Python importing omega|ml).
const LIST_TIMEOUT: Duration = Duration::from_secs(180);
/// After a failed listing, names stay unknown this long before the next try.
const RETRY_LISTING: Duration = Duration::from_secs(60);

impl PythonCatalog {
    /// A catalog for `runtime`; `native` are the names om-worker runs itself.
    pub fn new(runtime: Arc<PythonRuntime>, native: impl IntoIterator<Item = String>) -> Self {
        PythonCatalog {
            runtime,
            native: native.into_iter().collect(),
            listing: tokio::sync::Mutex::new(Listing::NotYet),
        }
    }

    /// Lists the tasks now if not done yet (start-up warming; failures are
    /// logged and retried on use, as for any listing). No spare task child
    /// is forked here: a worker that only runs notebooks keeps none; the
    /// first Python task forks the first one.
    pub async fn preload(&self) {
        self.loaded().await;
    }

    /// The names listed so far (none while the listing runs or failed);
    /// for `inspect registered`, which must not wait for Python.
    pub fn listed(&self) -> Vec<String> {
        match self.listing.try_lock().as_deref() {
            Ok(Listing::Loaded(tasks)) => tasks.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// The tasks, listing them first if needed (one listing at a time).
    async fn loaded(&self) -> Option<Arc<HashMap<String, Arc<dyn Task>>>> {
        let mut listing = self.listing.lock().await;
        match &*listing {
            Listing::Loaded(tasks) => return Some(Arc::clone(tasks)),
            Listing::Failed(at) if at.elapsed() < RETRY_LISTING => return None,
            _ => {}
        }
        match self.list().await {
            Ok(names) => {
                // om-worker's own tasks stay listed: a message of theirs that
                // carries canvas runs here (see `Registry::resolve_canvas`).
                let tasks: HashMap<String, Arc<dyn Task>> = names
                    .into_iter()
                    .map(|n| {
                        let task: Arc<dyn Task> =
                            Arc::new(PythonTask::new(&n, Arc::clone(&self.runtime)));
                        (n, task)
                    })
                    .collect();
                let mut names: Vec<_> = tasks
                    .keys()
                    .filter(|n| !self.native.contains(*n))
                    .cloned()
                    .collect();
                names.sort();
                info!(
                    "python tasks (one fresh child process per task): {}",
                    names.join(", ")
                );
                let tasks = Arc::new(tasks);
                *listing = Listing::Loaded(Arc::clone(&tasks));
                Some(tasks)
            }
            Err(e) => {
                warn!("no python tasks for now (next try in {RETRY_LISTING:?}): {e}");
                *listing = Listing::Failed(std::time::Instant::now());
                None
            }
        }
    }

    /// The names, from a child forked from the fork server (no imports to
    /// pay), else from a plain `om_taskrunner.py --list-tasks` process.
    async fn list(&self) -> Result<Vec<String>, String> {
        let rt = &self.runtime;
        if let Some(fs) = &rt.fork_server {
            match self.list_forked(fs).await {
                Ok(names) => return Ok(names),
                Err(e) => warn!(
                    "listing python tasks in a forked child failed ({e}); starting a plain process"
                ),
            }
        }
        let script = rt.runner_script()?;
        let run = tokio::process::Command::new(&rt.python)
            .arg(&script)
            .arg("--list-tasks")
            .env_clear()
            .envs(&rt.env)
            .current_dir(&rt.cwd)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(LIST_TIMEOUT, run)
            .await
            .map_err(|_| format!("listing them took longer than {LIST_TIMEOUT:?}"))?
            .map_err(|e| format!("cannot run {}: {e}", rt.python.display()))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(format!(
                "listing them failed ({}): {}",
                out.status,
                err.trim().lines().last().unwrap_or("")
            ));
        }
        serde_json::from_slice::<Vec<String>>(&out.stdout)
            .map_err(|e| format!("unreadable task list: {e}"))
    }

    async fn list_forked(&self, fs: &ForkServerLauncher) -> Result<Vec<String>, String> {
        let dir = crate::kernel::launcher::RuntimeDir::create()
            .map_err(|e| format!("cannot create a directory: {e}"))?;
        let request = dir.0.join("request.json");
        let body = json!({"list_tasks": true, "result_dir": dir.0.to_string_lossy()});
        std::fs::write(&request, body.to_string())
            .map_err(|e| format!("cannot write the request: {e}"))?;
        let child = fs.fork_task(&request, &BTreeMap::new(), None).await?;
        let exit = tokio::time::timeout(LIST_TIMEOUT, child.exited())
            .await
            .map_err(|_| format!("listing them took longer than {LIST_TIMEOUT:?}"))?;
        child.kill().await;
        let bytes = std::fs::read(dir.0.join("tasks.json"))
            .map_err(|e| format!("no task list ({exit}): {e}"))?;
        serde_json::from_slice::<Vec<String>>(&bytes)
            .map_err(|e| format!("unreadable task list: {e}"))
    }
}

#[async_trait]
impl TaskSource for PythonCatalog {
    async fn get(&self, name: &str) -> Option<Arc<dyn Task>> {
        self.loaded().await?.get(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime(python: PathBuf, cwd: &Path) -> Arc<PythonRuntime> {
        Arc::new(PythonRuntime::new(
            None,
            python,
            BTreeMap::new(),
            cwd.to_path_buf(),
            Serializer::Pickle,
            None,
            KernelTracker::new(),
        ))
    }

    /// Which names go to Python: what the listing says; om-worker's own
    /// tasks only for messages carrying canvas. (The listing itself is the
    /// real omega|ml app's in tests/interop/test_runtime_models.py; here a
    /// stand-in prints it.)
    #[tokio::test]
    async fn catalog_routes_listed_names_and_native_ones_only_for_canvas() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = dir.path().join("python");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho '[\"omegaml.tasks.omega_fit\", \"omegaml.tasks.omega_ping\"]'\n",
        )
        .expect("write");
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let registry = super::super::Registry::builtin();
        let catalog = Arc::new(PythonCatalog::new(
            runtime(fake, dir.path()),
            registry.names().into_iter().map(str::to_owned),
        ));
        let catalog_names = Arc::clone(&catalog);
        assert!(
            catalog_names.listed().is_empty(),
            "not listed before first use"
        );
        let registry = registry.with_fallback(catalog);
        let fit = registry
            .resolve("omegaml.tasks.omega_fit")
            .await
            .expect("listed");
        assert_eq!(fit.name(), "omegaml.tasks.omega_fit");
        assert!(fit.runs_canvas());
        let ping = registry
            .resolve("omegaml.tasks.omega_ping")
            .await
            .expect("native");
        assert!(!ping.runs_canvas(), "om-worker's own ping first");
        let ping = registry
            .resolve_canvas("omegaml.tasks.omega_ping")
            .await
            .expect("listed in Python too");
        assert!(
            ping.runs_canvas(),
            "the Python ping for a message with canvas"
        );
        assert!(registry.resolve("no.such.task").await.is_none());
        assert!(registry.resolve_canvas("no.such.task").await.is_none());
        let mut listed = catalog_names.listed();
        listed.sort();
        assert_eq!(
            listed,
            ["omegaml.tasks.omega_fit", "omegaml.tasks.omega_ping"]
        );
    }

    #[tokio::test]
    async fn a_failed_listing_leaves_names_unknown_and_is_not_cached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let catalog = PythonCatalog::new(
            runtime(dir.path().join("no-python-here"), dir.path()),
            Vec::new(),
        );
        assert!(catalog.get("omegaml.tasks.omega_fit").await.is_none());
        assert!(matches!(*catalog.listing.lock().await, Listing::Failed(_)));
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) {
        std::fs::write(dir.join(name), bytes).expect("write");
    }

    #[test]
    fn success_is_relayed_serialized() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "result.bin", b"\x80\x04K\x01.");
        write(
            dir.path(),
            "outcome.json",
            br#"{"status": "SUCCESS", "repr": "1", "content_type": "application/x-python-serialize"}"#,
        );
        let out = read_outcome(dir.path(), KernelExit::Code(0), Serializer::Pickle).expect("ok");
        assert_eq!(
            out,
            Output::Serialized(SerializedValue {
                serializer: Serializer::Pickle,
                bytes: b"\x80\x04K\x01.".to_vec(),
                repr: "1".into(),
            })
        );
    }

    #[test]
    fn failure_carries_type_module_args_and_traceback() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "outcome.json",
            br#"{"status": "FAILURE", "exc_type": "ValueError", "exc_module": "builtins",
                 "exc_message": [{"$tuple": ["bad", 1]}], "traceback": "Traceback ..."}"#,
        );
        let err = read_outcome(dir.path(), KernelExit::Code(0), Serializer::Pickle)
            .expect_err("a failure");
        assert_eq!(err.exception.exc_type, "ValueError");
        assert_eq!(err.exception.exc_module, "builtins");
        assert_eq!(
            err.exception.exc_message,
            vec![Value::Tuple(vec![Value::from("bad"), Value::Int(1)])]
        );
        assert_eq!(err.traceback.as_deref(), Some("Traceback ..."));
    }

    #[test]
    fn sent_entries_are_read_leniently() {
        let v = json!([
            ["a.t", "q", 2],
            ["b", "r", 1],
            ["bad"],
            [1, "q", 1],
            ["c", "q", -1]
        ]);
        assert_eq!(
            sent_tasks(Some(&v)),
            [("a.t".into(), "q".into(), 2), ("b".into(), "r".into(), 1)]
        );
        assert!(sent_tasks(None).is_empty());
        assert!(sent_tasks(Some(&json!({"a": 1}))).is_empty());
    }

    #[test]
    fn a_child_that_died_without_an_outcome_is_worker_lost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err =
            read_outcome(dir.path(), KernelExit::Signal(9), Serializer::Pickle).expect_err("lost");
        assert_eq!(
            (
                err.exception.exc_module.as_str(),
                err.exception.exc_type.as_str()
            ),
            ("billiard.exceptions", "WorkerLostError")
        );
        assert_eq!(
            err.exception.exc_message,
            vec![Value::from(
                "Worker exited prematurely: signal 9 (SIGKILL) Job: 0."
            )]
        );
        let err =
            read_outcome(dir.path(), KernelExit::Code(3), Serializer::Pickle).expect_err("lost");
        assert!(err.exception.exc_message[0].repr().contains("exitcode 3"));
        // A broken outcome file is a clear internal error, not a success.
        write(dir.path(), "outcome.json", b"{not json");
        let err = read_outcome(dir.path(), KernelExit::Code(0), Serializer::Pickle)
            .expect_err("unreadable");
        assert_eq!(err.exception.exc_type, "WorkerInternalError");
    }
}
