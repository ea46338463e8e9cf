//! [`ForkServerLauncher`]: kernels forked from a Python that has already imported ipykernel and
//! omegaml.
//!
//! A fresh kernel spends ~3 CPU-seconds importing omegaml (pandas, scikit-learn, celery) before
//! the first cell does anything; a process forked from one that did those imports once costs
//! tens of milliseconds. The fork server (`python/om_forkserver.py`, embedded in the binary and
//! written to a private 0700 dir at start) is started once per launcher with the kernelspec's
//! interpreter and options, **the exact environment and cwd the kernels get** (omegaml reads its
//! configuration from the environment and `config.yml` in the cwd at import time), imports the
//! preload list, opens no connections, and forks one child per request. The child calls
//! `setsid()`, applies env/cwd, resets signals, reseeds RNGs, closes the server's descriptors and
//! only then creates the IPython kernel app (ZeroMQ context and sockets after the fork).
//!
//! Isolation is the same as with [`LocalLauncher`]: one process per kernel, nothing returns to
//! the server. What a child inherits is exactly the server's state after the imports, which no
//! task can change.
//!
//! Lifecycle and failure handling:
//! - requests and replies are JSON lines on the server's stdin/stdout; every message is treated
//!   as outside input (no `unwrap`, bounded line length);
//! - the server reports each child's exit status (`waitpid` on SIGCHLD), which feeds the
//!   kernel's [`KernelProcess`] so the executor sees kernel death as quickly as for a local child;
//! - kernels lead their own process group and are registered in the launcher's
//!   [`KernelTracker`];
//! - when om-worker exits or drops the launcher, the server sees EOF on stdin, SIGKILLs its
//!   kernels' groups and exits; if the server is SIGKILLed, we SIGKILL its kernels' groups when
//!   its stdout closes (and ipykernel's parent poller, pointed at the server, ends them within
//!   about a second on its own);
//! - if the server cannot start (no ipykernel, crash during imports), every launch falls back to
//!   [`LocalLauncher`] (logged once); if it dies later it is restarted up to
//!   [`ForkServerConfig::max_restarts`] times, then the fallback is permanent;
//! - requests the server cannot serve faithfully go to [`LocalLauncher`]: a kernelspec that is
//!   not `<python> [-opts] -m ipykernel_launcher ...`, or an env/cwd different from the server's
//!   (module-level state such as `omegaml.defaults` was computed from the server's).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::{oneshot, watch};

use super::client::KernelClient;
use super::kernelspec::{python_prefix, KernelSpec};
use super::launcher::{kernel_env_vars, wait_ready, PreparedConnection, RuntimeDir};
use super::process::{KernelExit, KernelProcess, KernelTracker};
use super::{Kernel, KernelEnv, KernelError, KernelLauncher, LaunchOptions, LocalLauncher};

/// The fork server script, shipped inside the binary so a deployed worker needs no extra file.
pub const FORKSERVER_SCRIPT: &str = include_str!("../../python/om_forkserver.py");

/// The kernel without a kernel app the fork server's `shell` op runs in its child
/// (`python/om_shell.py`); written next to the fork server script, where the server loads it from.
pub const SHELL_SCRIPT: &str = include_str!("../../python/om_shell.py");

/// The task runner the fork server's `task` op runs in its child (`python/om_taskrunner.py`);
/// written next to the fork server script, where the server loads it from.
pub const TASKRUNNER_SCRIPT: &str = include_str!("../../python/om_taskrunner.py");

/// Longest protocol line accepted from the server (a fork reply is < 100 bytes; the ready
/// message lists the preload results).
const MAX_LINE: usize = 1 << 20;

/// How long a fork request may take (the fork itself is milliseconds).
const FORK_TIMEOUT: Duration = Duration::from_secs(30);

/// How the fork server makes a notebook's kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelMode {
    /// ipykernel's own kernel object and shell, built once in the server
    /// (`python/om_shell.py`); each run's child only connects to om-worker over one Unix socket
    /// and runs the cells. The default: a notebook run then costs what its cells cost (no
    /// ZeroMQ sockets, threads or traitlets configuration per run), with ipykernel's messages.
    #[default]
    Shell,
    /// A full ipykernel app per run, forked: ZeroMQ sockets, heartbeat/IOPub/control threads and
    /// the shell set up in each child (what `python -m ipykernel_launcher` does).
    Ipykernel,
}

impl std::str::FromStr for KernelMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "shell" => Ok(KernelMode::Shell),
            "ipykernel" => Ok(KernelMode::Ipykernel),
            other => Err(format!("{other:?}: expected shell or ipykernel")),
        }
    }
}

impl std::fmt::Display for KernelMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelMode::Shell => "shell",
            KernelMode::Ipykernel => "ipykernel",
        })
    }
}

/// Fork server settings.
#[derive(Debug, Clone)]
pub struct ForkServerConfig {
    /// Kernel Python (as for [`LocalLauncher`]; the kernelspec's argv decides the interpreter).
    pub python: PathBuf,
    /// Modules imported once in addition to the server's defaults (`omegaml` and the submodules
    /// its lazy setup imports). A failing import is logged, not fatal.
    pub preload: Vec<String>,
    /// Import the server's default list (`omegaml` and friends) too. Off: only ipykernel and
    /// `preload` (tests, non-omega|ml kernels).
    pub default_preload: bool,
    /// Environment of the server and its kernels (the worker: [`KernelEnv::omega`]).
    pub env: KernelEnv,
    /// Working directory of the server and its kernels (omega|ml: `OMEGA_TMP`).
    pub cwd: Option<PathBuf>,
    /// Kernel whose interpreter the server runs (`python3`).
    pub kernel_name: String,
    /// Restarts after the server died, before falling back to local launches for good.
    pub max_restarts: u32,
    /// Start → "ready" limit (the imports take seconds; generous under load).
    pub ready_timeout: Duration,
    /// Keep one spare task child per task environment, forked and warmed up
    /// (`om_taskrunner.warm_up`) ahead of the next task: see
    /// [`ForkServerLauncher::fork_task_warm`].
    pub task_spares: bool,
    /// How notebook kernels are made (see [`KernelMode`]).
    pub kernel_mode: KernelMode,
}

impl ForkServerConfig {
    /// Defaults for `python`: default preload list, inherited env, worker cwd, `python3`,
    /// 3 restarts, 120 s.
    pub fn new(python: impl Into<PathBuf>) -> Self {
        ForkServerConfig {
            python: python.into(),
            preload: Vec::new(),
            default_preload: true,
            env: KernelEnv::inherit(),
            cwd: None,
            kernel_name: "python3".into(),
            max_restarts: 3,
            ready_timeout: Duration::from_secs(120),
            task_spares: true,
            kernel_mode: KernelMode::default(),
        }
    }
}

/// Counters (for logs and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForkServerStats {
    /// Kernels forked by the server.
    pub forked: u64,
    /// Kernels started by the local fallback.
    pub local: u64,
    /// Server processes started (1 + restarts).
    pub server_starts: u32,
    /// Tasks run by a spare child (forked and warmed up ahead of them).
    pub spares_used: u64,
}

/// Protocol messages from the server.
#[derive(Debug, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
enum Event {
    Ready {
        pid: i32,
        #[serde(default)]
        preload: BTreeMap<String, Option<String>>,
        #[serde(default)]
        warnings: Vec<String>,
        /// Why the `shell` op is unavailable (`None`: available).
        #[serde(default)]
        shell: Option<String>,
    },
    Fatal {
        error: String,
    },
    Forked {
        id: u64,
        pid: i32,
    },
    /// A spare was handed its task (`go`).
    Started {
        id: u64,
        pid: i32,
    },
    Error {
        id: Option<u64>,
        error: String,
    },
    Pong {
        #[allow(dead_code)]
        id: Option<u64>,
    },
    Exit {
        pid: i32,
        code: Option<i32>,
        signal: Option<i32>,
    },
}

type ForkReply = Result<(i32, watch::Receiver<Option<KernelExit>>), String>;

/// State shared between a server handle and its stdout reader task.
#[derive(Default)]
struct Shared {
    alive: AtomicBool,
    pending: Mutex<HashMap<u64, oneshot::Sender<ForkReply>>>,
    kernels: Mutex<HashMap<i32, watch::Sender<Option<KernelExit>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a fork request failed.
#[derive(Debug, thiserror::Error)]
enum ForkError {
    /// The server is gone (restart it).
    #[error("fork server gone")]
    Gone,
    /// The server answered with an error, or not in time.
    #[error("{0}")]
    Failed(String),
}

/// One running fork server. Dropping it closes the server's stdin, so the server SIGKILLs its
/// kernels and exits by itself; the child is deliberately not `kill_on_drop` (a SIGKILLed server
/// could not clean up), and tokio reaps it.
struct Server {
    pid: i32,
    interp: Vec<String>,
    env: BTreeMap<String, String>,
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    child: tokio::sync::Mutex<Option<Child>>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    started: Instant,
    /// Why this server cannot fork shells (`None`: it can).
    shell_unavailable: Option<String>,
    _dir: RuntimeDir,
}

impl Server {
    fn alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }

    async fn fork(
        &self,
        args: Vec<String>,
        env: &BTreeMap<String, String>,
        cwd: Option<&PathBuf>,
        rlimit_as: Option<u64>,
    ) -> Result<(i32, watch::Receiver<Option<KernelExit>>), ForkError> {
        let req = json!({"op": "fork", "argv": args});
        self.spawn_child(req, env, cwd, rlimit_as).await
    }

    /// Asks the server for a forked shell (`op: shell`) that connects to `socket`.
    async fn fork_shell(
        &self,
        socket: &std::path::Path,
        env: &BTreeMap<String, String>,
        cwd: Option<&PathBuf>,
        rlimit_as: Option<u64>,
    ) -> Result<(i32, watch::Receiver<Option<KernelExit>>), ForkError> {
        let req = json!({"op": "shell", "socket": socket.to_string_lossy()});
        self.spawn_child(req, env, cwd, rlimit_as).await
    }

    /// Asks the server for a child that runs one task (`op: task`, see
    /// `python/om_taskrunner.py`) from the request file `request`.
    async fn fork_task(
        &self,
        request: &std::path::Path,
        env: &BTreeMap<String, String>,
        cwd: Option<&PathBuf>,
        rlimit_as: Option<u64>,
    ) -> Result<(i32, watch::Receiver<Option<KernelExit>>), ForkError> {
        let req = json!({"op": "task", "request": request.to_string_lossy()});
        self.spawn_child(req, env, cwd, rlimit_as).await
    }

    /// Asks the server for a spare task child (`op: spare`): prepared as
    /// for `fork_task`, warmed up (`om_taskrunner.warm_up`), waiting for
    /// [`Self::go`].
    async fn spare(
        &self,
        hostname: &str,
        env: &BTreeMap<String, String>,
        cwd: Option<&PathBuf>,
        rlimit_as: Option<u64>,
    ) -> Result<(i32, watch::Receiver<Option<KernelExit>>), ForkError> {
        let req = json!({"op": "spare", "hostname": hostname});
        self.spawn_child(req, env, cwd, rlimit_as).await
    }

    /// Hands spare `pid` the request file `request`; it runs that one task.
    async fn go(
        &self,
        pid: i32,
        request: &std::path::Path,
    ) -> Result<(i32, watch::Receiver<Option<KernelExit>>), ForkError> {
        let req = json!({"op": "go", "pid": pid, "request": request.to_string_lossy()});
        self.send(req).await
    }

    /// Closes spare `pid`'s pipe: it exits without running anything.
    async fn retire(&self, pid: i32) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // No reply; a server that is gone takes its spares along anyway.
        let _ = self
            .write_line(&json!({"op": "retire", "id": id, "pid": pid}))
            .await;
    }

    /// Writes one request line to the server's stdin (bounded: a server that
    /// stopped reading is as good as gone). `false` when it could not.
    async fn write_line(&self, req: &serde_json::Value) -> bool {
        let mut line = req.to_string();
        line.push('\n');
        let mut stdin = self.stdin.lock().await;
        let Some(s) = stdin.as_mut() else {
            return false;
        };
        let written = tokio::time::timeout(Duration::from_secs(5), async {
            s.write_all(line.as_bytes()).await?;
            s.flush().await
        })
        .await;
        matches!(written, Ok(Ok(())))
    }

    /// Sends one request that forks a child (`req`: its op and op fields;
    /// the environment, cwd and memory limit every child gets are added
    /// here) and waits for the server's `forked` reply.
    async fn spawn_child(
        &self,
        mut req: serde_json::Value,
        env: &BTreeMap<String, String>,
        cwd: Option<&PathBuf>,
        rlimit_as: Option<u64>,
    ) -> Result<(i32, watch::Receiver<Option<KernelExit>>), ForkError> {
        if let Some(obj) = req.as_object_mut() {
            obj.insert("env".into(), json!(env));
            obj.insert(
                "cwd".into(),
                json!(cwd.map(|c| c.to_string_lossy().into_owned())),
            );
            obj.insert("rlimit_as".into(), json!(rlimit_as));
        }
        self.send(req).await
    }

    /// Sends one request (its id added here) and waits for the server's
    /// `forked`/`started` reply.
    async fn send(
        &self,
        mut req: serde_json::Value,
    ) -> Result<(i32, watch::Receiver<Option<KernelExit>>), ForkError> {
        if !self.alive() {
            return Err(ForkError::Gone);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Some(obj) = req.as_object_mut() {
            obj.insert("id".into(), id.into());
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.shared.pending).insert(id, tx);
        if !self.write_line(&req).await {
            lock(&self.shared.pending).remove(&id);
            return Err(ForkError::Gone);
        }
        match tokio::time::timeout(FORK_TIMEOUT, rx).await {
            Ok(Ok(Ok(x))) => Ok(x),
            Ok(Ok(Err(msg))) => Err(ForkError::Failed(msg)),
            Ok(Err(_)) => Err(ForkError::Gone),
            Err(_) => {
                // A late reply finds no requester and kills the child (see the reader).
                lock(&self.shared.pending).remove(&id);
                Err(ForkError::Failed(format!(
                    "no fork reply within {FORK_TIMEOUT:?}"
                )))
            }
        }
    }

    /// Closes stdin (the server SIGKILLs its kernels and exits) and waits for it, bounded.
    async fn stop(&self) {
        drop(self.stdin.lock().await.take());
        if let Some(mut child) = self.child.lock().await.take() {
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
            }
        }
    }
}

/// Reads newline-terminated lines, at most [`MAX_LINE`] bytes each (longer ones are dropped).
struct LineReader(BufReader<ChildStdout>);

impl LineReader {
    async fn next_line(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut line = Vec::new();
        let mut overflow = false;
        loop {
            let buf = self.0.fill_buf().await?;
            if buf.is_empty() {
                return Ok((!line.is_empty()).then_some(line));
            }
            if let Some(i) = buf.iter().position(|&b| b == b'\n') {
                if !overflow {
                    line.extend_from_slice(&buf[..i]);
                }
                self.0.consume(i + 1);
                if overflow {
                    tracing::warn!("fork server: dropped an over-long protocol line");
                    line.clear();
                }
                return Ok(Some(line));
            }
            let n = buf.len();
            if !overflow {
                line.extend_from_slice(buf);
            }
            self.0.consume(n);
            if line.len() > MAX_LINE {
                overflow = true;
                line.clear();
            }
        }
    }
}

fn parse_event(line: &[u8]) -> Option<Event> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    match serde_json::from_slice::<Event>(line) {
        Ok(ev) => Some(ev),
        Err(e) => {
            tracing::warn!(
                error = %e,
                line = %String::from_utf8_lossy(&line[..line.len().min(200)]),
                "fork server: unparseable message ignored"
            );
            None
        }
    }
}

/// Dispatches server events until its stdout closes, then cleans up after it.
async fn read_events(mut reader: LineReader, shared: Arc<Shared>, server_pid: i32) {
    loop {
        let line = match reader.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "fork server: reading its output failed");
                break;
            }
        };
        let Some(ev) = parse_event(&line) else {
            continue;
        };
        match ev {
            Event::Forked { id, pid } if pid > 1 => {
                let (tx, rx) = watch::channel(None);
                lock(&shared.kernels).insert(pid, tx);
                let requester = lock(&shared.pending).remove(&id);
                let delivered = match requester {
                    Some(r) => r.send(Ok((pid, rx))).is_ok(),
                    None => false,
                };
                if !delivered {
                    // The launch was cancelled or timed out: nobody will ever own this kernel.
                    tracing::debug!(pid, "fork server: unclaimed kernel killed");
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            Event::Started { id, pid } => {
                // The spare's exit watch was created when it was forked.
                let exit = lock(&shared.kernels)
                    .get(&pid)
                    .map(watch::Sender::subscribe);
                let reply = exit
                    .map(|rx| (pid, rx))
                    .ok_or_else(|| format!("spare {pid} exited"));
                let requester = lock(&shared.pending).remove(&id);
                let delivered = match requester {
                    Some(r) => r.send(reply).is_ok(),
                    None => false,
                };
                if !delivered && pid > 1 {
                    tracing::debug!(pid, "fork server: unclaimed task killed");
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            Event::Forked { id, pid } => {
                tracing::warn!(pid, "fork server: invalid pid in reply");
                if let Some(r) = lock(&shared.pending).remove(&id) {
                    let _ = r.send(Err(format!("invalid pid {pid}")));
                }
            }
            Event::Error {
                id: Some(id),
                error,
            } => {
                if let Some(r) = lock(&shared.pending).remove(&id) {
                    let _ = r.send(Err(error));
                }
            }
            Event::Error { id: None, error } => {
                tracing::warn!(%error, "fork server error");
            }
            Event::Exit { pid, code, signal } => {
                let exit = match (code, signal) {
                    (_, Some(s)) => KernelExit::Signal(s),
                    (Some(c), None) => KernelExit::Code(c),
                    (None, None) => KernelExit::Unknown("no status".into()),
                };
                if let Some(tx) = lock(&shared.kernels).remove(&pid) {
                    tracing::debug!(pid, %exit, "forked kernel exited");
                    let _ = tx.send(Some(exit));
                }
            }
            Event::Pong { .. } => {}
            Event::Ready { .. } | Event::Fatal { .. } => {
                tracing::debug!("fork server: unexpected start-up message ignored");
            }
        }
    }
    // The server is gone (crashed, killed -- possibly by a task --, or exited after we closed
    // its stdin, in which case it killed its children itself).
    shared.alive.store(false, Ordering::SeqCst);
    lock(&shared.pending).clear();
    let orphans: Vec<(i32, watch::Sender<Option<KernelExit>>)> =
        lock(&shared.kernels).drain().collect();
    if !orphans.is_empty() {
        tracing::warn!(
            server_pid,
            children = orphans.len(),
            "fork server exited: its running kernels and tasks go on (watched until they end)"
        );
    }
    for (pid, tx) in orphans {
        // A child outlives its server (it ends with om-worker, see `_watch_owner`): one task
        // that kills the server harms no other slot. Its exit status went with the server.
        tokio::spawn(async move {
            while pid_exists(pid) && !tx.is_closed() {
                tokio::time::sleep(ORPHAN_POLL).await;
            }
            let _ = tx.send(Some(KernelExit::Unknown(
                "exit status lost with its fork server".into(),
            )));
        });
    }
}

/// How often a child whose fork server died is checked for its end.
const ORPHAN_POLL: Duration = Duration::from_millis(50);

/// True when `/proc/<pid>` exists and is not a zombie.
fn pid_exists(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}

/// Where the forkable kernelspec argv splits: `argv[..i]` is the interpreter with its options,
/// `argv[i..i + 2]` is `-m ipykernel_launcher`, the rest are kernel app arguments.
fn ipykernel_split(argv: &[String]) -> Option<usize> {
    let i = argv
        .windows(2)
        .position(|w| w[0] == "-m" && w[1] == "ipykernel_launcher")?;
    let opts_ok = i >= 1
        && argv[1..i]
            .iter()
            .all(|a| a.starts_with('-') && a != "-m" && a != "-c");
    opts_ok.then_some(i)
}

/// Which tasks a spare can run: those whose child gets the same
/// environment, memory limit and Celery hostname (what it was prepared and
/// warmed up with).
#[derive(Debug, Clone, PartialEq, Eq)]
struct SpareKey {
    env: BTreeMap<String, String>,
    rlimit_as: Option<u64>,
    hostname: String,
}

/// A task child forked and warmed up ahead of its task, waiting for `go`.
/// It has never run a task and runs at most one.
struct Spare {
    key: SpareKey,
    pid: i32,
    server_pid: i32,
    exit: watch::Receiver<Option<KernelExit>>,
    born: Instant,
}

/// A task child's environment: the server's plus `extra_env` (a GPU slot's).
fn task_env(plan: &Plan, extra_env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut env = plan.env.clone();
    env.extend(extra_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// A spare older than this is retired instead of used: its MongoDB
/// connection and omega|ml settings are then as fresh as a cold child's.
const SPARE_MAX_AGE: Duration = Duration::from_secs(600);

#[derive(Default)]
struct Slot {
    server: Option<Arc<Server>>,
    disabled: Option<String>,
}

/// Launches kernels by forking them from a pre-imported Python (see the module docs); falls
/// back to [`LocalLauncher`] whenever forking is unavailable or would not be faithful.
pub struct ForkServerLauncher {
    config: ForkServerConfig,
    local: LocalLauncher,
    slot: tokio::sync::Mutex<Slot>,
    fallback_logged: AtomicBool,
    forked: AtomicU64,
    local_launches: AtomicU64,
    starts: AtomicU32,
    spares: Mutex<Vec<Spare>>,
    spares_used: AtomicU64,
    /// Starts since the server last ran for [`RESTART_BUDGET_RESET`].
    budget_used: AtomicU32,
}

/// A server that ran this long before it died resets the restart budget.
const RESTART_BUDGET_RESET: Duration = Duration::from_secs(300);

impl std::fmt::Debug for ForkServerLauncher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForkServerLauncher")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// What the server needs to serve one request.
struct Plan {
    spec: KernelSpec,
    split: usize,
    interp: Vec<String>,
    env: BTreeMap<String, String>,
}

impl ForkServerLauncher {
    /// A launcher; the server starts on the first forkable launch (or [`Self::start`]).
    /// Forked kernels and those of the local fallback are registered in `kernels`.
    pub fn new(config: ForkServerConfig, kernels: KernelTracker) -> Self {
        ForkServerLauncher {
            local: LocalLauncher::new(config.python.clone(), kernels),
            config,
            slot: tokio::sync::Mutex::new(Slot::default()),
            fallback_logged: AtomicBool::new(false),
            forked: AtomicU64::new(0),
            local_launches: AtomicU64::new(0),
            starts: AtomicU32::new(0),
            spares: Mutex::new(Vec::new()),
            spares_used: AtomicU64::new(0),
            budget_used: AtomicU32::new(0),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> ForkServerStats {
        ForkServerStats {
            forked: self.forked.load(Ordering::Relaxed),
            local: self.local_launches.load(Ordering::Relaxed),
            server_starts: self.starts.load(Ordering::Relaxed),
            spares_used: self.spares_used.load(Ordering::Relaxed),
        }
    }

    /// The tracker its kernels (forked or local) are registered in.
    pub fn kernels(&self) -> &KernelTracker {
        self.local.kernels()
    }

    /// Pid of the running server, if any.
    pub async fn server_pid(&self) -> Option<i32> {
        let slot = self.slot.lock().await;
        slot.server.as_ref().filter(|s| s.alive()).map(|s| s.pid)
    }

    /// Why launches go to the local launcher for good, if they do.
    pub async fn disabled_reason(&self) -> Option<String> {
        self.slot.lock().await.disabled.clone()
    }

    /// Starts the server now for the configured kernel/env/cwd (instead of on the first launch).
    /// Returns its pid, or why it is unavailable (launches then fall back to local).
    pub async fn start(&self) -> Result<i32, String> {
        let plan = self.configured_plan()?;
        self.server_for(&plan).await.map(|s| s.pid)
    }

    /// The plan for the configured kernel, env and cwd (what the server is started for).
    fn configured_plan(&self) -> Result<Plan, String> {
        let spec = self
            .local
            .resolve(&self.config.kernel_name)
            .map_err(|e| e.to_string())?;
        self.plan(&spec, &self.config.env, self.config.cwd.as_ref())
            .map_err(str::to_owned)
    }

    /// Checks that a request can be forked faithfully by a server of this launcher.
    fn plan(
        &self,
        spec: &KernelSpec,
        env: &KernelEnv,
        cwd: Option<&PathBuf>,
    ) -> Result<Plan, &'static str> {
        if !spec.is_ipykernel() {
            return Err("kernelspec is not ipykernel");
        }
        let prefix = python_prefix(&self.local.python);
        let argv = spec.expand_argv(std::path::Path::new("{connection_file}"), prefix.as_deref());
        let split = ipykernel_split(&argv)
            .ok_or("kernelspec argv is not `python -m ipykernel_launcher`")?;
        if cwd != self.config.cwd.as_ref() {
            return Err("cwd differs from the fork server's");
        }
        let vars = kernel_env_vars(env, spec);
        if vars != kernel_env_vars(&self.config.env, spec) {
            return Err("environment differs from the fork server's");
        }
        Ok(Plan {
            spec: spec.clone(),
            split,
            interp: argv[..split].to_vec(),
            env: vars,
        })
    }

    /// The running server for `plan`, (re)starting it within the restart budget.
    async fn server_for(&self, plan: &Plan) -> Result<Arc<Server>, String> {
        let mut slot = self.slot.lock().await;
        if let Some(reason) = &slot.disabled {
            return Err(reason.clone());
        }
        if let Some(server) = &slot.server {
            if server.alive() {
                if server.interp != plan.interp || server.env != plan.env {
                    return Err("request differs from the fork server's interpreter/env".into());
                }
                return Ok(Arc::clone(server));
            }
            tracing::warn!(pid = server.pid, "fork server died");
            if server.started.elapsed() >= RESTART_BUDGET_RESET {
                // Ran fine for a while: a crash now and then never disables it for good.
                self.budget_used.store(0, Ordering::Relaxed);
            }
            slot.server = None;
        }
        let starts = self.budget_used.load(Ordering::Relaxed);
        if starts > self.config.max_restarts {
            let reason = format!("fork server died {starts} times in a row; not restarting it");
            self.log_fallback(&reason);
            slot.disabled = Some(reason.clone());
            return Err(reason);
        }
        self.starts.fetch_add(1, Ordering::Relaxed);
        self.budget_used.fetch_add(1, Ordering::Relaxed);
        match self.spawn_server(plan).await {
            Ok(server) => {
                let server = Arc::new(server);
                slot.server = Some(Arc::clone(&server));
                Ok(server)
            }
            Err(reason) => {
                let reason = format!("fork server unavailable: {reason}");
                self.log_fallback(&reason);
                slot.disabled = Some(reason.clone());
                Err(reason)
            }
        }
    }

    /// Forks a child that runs one task from the request file `request`
    /// (`python/om_taskrunner.py`), with the server's environment plus
    /// `extra_env` (a GPU slot's `CUDA_VISIBLE_DEVICES`), in its own session,
    /// registered in the tracker like a kernel. `Err` when no server can be
    /// used; the caller then runs the task in a plain process.
    pub async fn fork_task(
        &self,
        request: &std::path::Path,
        extra_env: &BTreeMap<String, String>,
        rlimit_as: Option<u64>,
    ) -> Result<KernelProcess, String> {
        let plan = self.configured_plan()?;
        let env = task_env(&plan, extra_env);
        for _attempt in 0..2 {
            let server = self.server_for(&plan).await?;
            match server
                .fork_task(request, &env, self.config.cwd.as_ref(), rlimit_as)
                .await
            {
                Ok((pid, exit)) => {
                    self.forked.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(pid, server = server.pid, "task child forked");
                    return Ok(KernelProcess::external(pid, exit, self.local.kernels()));
                }
                Err(ForkError::Gone) => continue,
                Err(ForkError::Failed(e)) => return Err(e),
            }
        }
        Err("fork server gone".into())
    }

    /// [`Self::fork_task`] for a task of the worker `hostname`, started in
    /// a spare child when one is waiting: forked earlier with the same
    /// environment and memory limit and warmed up (Celery's worker-process
    /// init, the default omega|ml instance, its MongoDB connection; see
    /// `warm_up` in `python/om_taskrunner.py`), so the task starts at its
    /// first line. A spare has never run a task and runs exactly one, like a
    /// fresh child. After each task a new spare is forked for the next one
    /// (one per environment, i.e. per GPU slot); a spare that died or grew
    /// older than [`SPARE_MAX_AGE`] is not used. `Err` as for `fork_task`.
    pub async fn fork_task_warm(
        &self,
        request: &std::path::Path,
        extra_env: &BTreeMap<String, String>,
        rlimit_as: Option<u64>,
        hostname: &str,
    ) -> Result<KernelProcess, String> {
        if !self.config.task_spares {
            return self.fork_task(request, extra_env, rlimit_as).await;
        }
        let plan = self.configured_plan()?;
        let key = SpareKey {
            env: task_env(&plan, extra_env),
            rlimit_as,
            hostname: hostname.to_owned(),
        };
        let cwd = self.config.cwd.as_ref();
        for _attempt in 0..2 {
            let server = self.server_for(&plan).await?;
            let (spare, stale) = self.take_spare(&key, server.pid);
            for pid in stale {
                server.retire(pid).await;
            }
            let started = match spare {
                Some(pid) => match server.go(pid, request).await {
                    Ok(x) => {
                        self.spares_used.fetch_add(1, Ordering::Relaxed);
                        Ok(x)
                    }
                    Err(ForkError::Failed(e)) => {
                        tracing::debug!(pid, "spare task child not usable ({e}); forking one");
                        server.fork_task(request, &key.env, cwd, rlimit_as).await
                    }
                    Err(ForkError::Gone) => Err(ForkError::Gone),
                },
                None => server.fork_task(request, &key.env, cwd, rlimit_as).await,
            };
            match started {
                Ok((pid, exit)) => {
                    self.forked.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(pid, server = server.pid, "task child started");
                    let child = KernelProcess::external(pid, exit, self.local.kernels());
                    self.refill(&server, &key).await;
                    return Ok(child);
                }
                Err(ForkError::Gone) => continue,
                Err(ForkError::Failed(e)) => return Err(e),
            }
        }
        Err("fork server gone".into())
    }

    /// The pid of a live spare of `server` for `key` (removed from the list),
    /// and the pids of spares too old to use (to retire); dead spares and
    /// those of an earlier server are dropped.
    fn take_spare(&self, key: &SpareKey, server_pid: i32) -> (Option<i32>, Vec<i32>) {
        let mut spares = lock(&self.spares);
        let mut stale = Vec::new();
        spares.retain(|s| {
            let alive = s.server_pid == server_pid && s.exit.borrow().is_none();
            if alive && s.born.elapsed() > SPARE_MAX_AGE {
                stale.push(s.pid);
                return false;
            }
            alive
        });
        let found = spares.iter().position(|s| s.key == *key);
        (found.map(|i| spares.swap_remove(i).pid), stale)
    }

    /// Forks a spare for `key` unless `server` has one already.
    async fn refill(&self, server: &Server, key: &SpareKey) {
        let has = |spares: &Vec<Spare>| {
            spares
                .iter()
                .any(|s| s.key == *key && s.server_pid == server.pid)
        };
        if has(&lock(&self.spares)) {
            return;
        }
        let cwd = self.config.cwd.as_ref();
        match server
            .spare(&key.hostname, &key.env, cwd, key.rlimit_as)
            .await
        {
            Ok((pid, exit)) => {
                let extra = {
                    let mut spares = lock(&self.spares);
                    let extra = has(&spares);
                    if !extra {
                        spares.push(Spare {
                            key: key.clone(),
                            pid,
                            server_pid: server.pid,
                            exit,
                            born: Instant::now(),
                        });
                    }
                    extra
                };
                if extra {
                    // A concurrent task forked one first.
                    server.retire(pid).await;
                }
            }
            Err(e) => tracing::debug!("no spare task child: {e}"),
        }
    }

    fn log_fallback(&self, reason: &str) {
        if !self.fallback_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!("{reason}; kernels are started as plain processes (slower start)");
        }
    }

    async fn spawn_server(&self, plan: &Plan) -> Result<Server, String> {
        let started = Instant::now();
        let dir = RuntimeDir::create().map_err(|e| format!("runtime dir: {e}"))?;
        let script = dir.0.join("om_forkserver.py");
        std::fs::write(&script, FORKSERVER_SCRIPT).map_err(|e| format!("writing script: {e}"))?;
        std::fs::write(dir.0.join("om_taskrunner.py"), TASKRUNNER_SCRIPT)
            .map_err(|e| format!("writing task runner: {e}"))?;
        std::fs::write(dir.0.join("om_shell.py"), SHELL_SCRIPT)
            .map_err(|e| format!("writing shell: {e}"))?;
        let mut cmd = tokio::process::Command::new(&plan.interp[0]);
        cmd.args(&plan.interp[1..]).arg(&script);
        if !self.config.default_preload {
            cmd.arg("--no-default-preload");
        }
        if self.config.kernel_mode != KernelMode::Shell {
            // its singletons would be in the way of the kernel apps it forks
            cmd.arg("--no-shell");
        }
        if !self.config.preload.is_empty() {
            cmd.arg("--preload").arg(self.config.preload.join(","));
        }
        cmd.env_clear()
            .envs(&plan.env)
            .env("JPY_PARENT_PID", std::process::id().to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            // Piped and logged line by line, escaped: kernels and task children inherit it,
            // and notebook code must not write raw lines into the worker's log.
            .stderr(std::process::Stdio::piped())
            // Own group: a terminal's Ctrl-C goes to om-worker, which decides what to kill.
            .process_group(0);
        if let Some(cwd) = &self.config.cwd {
            cmd.current_dir(cwd);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", plan.interp[0]))?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or("server exited at once")?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.start_kill();
            return Err("no pipes to the server".into());
        };
        if let Some(stderr) = child.stderr.take() {
            crate::logging::forward_child_stderr(stderr, "fork server/kernel stderr", pid);
        }
        let mut reader = LineReader(BufReader::new(stdout));
        let first = tokio::time::timeout(self.config.ready_timeout, async {
            loop {
                match reader.next_line().await {
                    Ok(Some(line)) => {
                        if let Some(ev) = parse_event(&line) {
                            return Ok(ev);
                        }
                    }
                    Ok(None) => return Err("server exited during start-up".to_string()),
                    Err(e) => return Err(format!("reading server output: {e}")),
                }
            }
        })
        .await;
        let shell_unavailable;
        let fail = |child: &mut Child, msg: String| {
            let _ = child.start_kill();
            msg
        };
        match first {
            Err(_) => {
                return Err(fail(
                    &mut child,
                    format!("not ready after {:?}", self.config.ready_timeout),
                ))
            }
            Ok(Err(e)) => {
                let status = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                let e = match status {
                    Ok(Ok(s)) => format!("{e} ({s})"),
                    _ => e,
                };
                return Err(fail(&mut child, e));
            }
            Ok(Ok(Event::Fatal { error })) => return Err(fail(&mut child, error)),
            Ok(Ok(Event::Ready {
                pid: reported,
                preload,
                warnings,
                shell,
            })) => {
                if let (Some(why), KernelMode::Shell) = (&shell, self.config.kernel_mode) {
                    tracing::warn!(
                        "fork server: notebooks run in forked ipykernel apps, its shell is \
                         unavailable: {why}"
                    );
                }
                shell_unavailable = shell;
                if reported != pid {
                    tracing::debug!(pid, reported, "fork server reports another pid");
                }
                let failed: Vec<String> = preload
                    .iter()
                    .filter_map(|(m, e)| e.as_ref().map(|e| format!("{m} ({e})")))
                    .collect();
                if !failed.is_empty() {
                    tracing::warn!(
                        "fork server: preload failed for {}; kernels import them themselves",
                        failed.join(", ")
                    );
                }
                for w in warnings {
                    tracing::warn!("fork server: {w}");
                }
                tracing::info!(
                    pid,
                    preloaded = preload.len() - failed.len(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "kernel fork server ready"
                );
            }
            Ok(Ok(_)) => {
                return Err(fail(
                    &mut child,
                    "unexpected first message from server".into(),
                ))
            }
        }
        let shared = Arc::new(Shared::default());
        shared.alive.store(true, Ordering::SeqCst);
        tokio::spawn(read_events(reader, Arc::clone(&shared), pid));
        Ok(Server {
            pid,
            interp: plan.interp.clone(),
            env: plan.env.clone(),
            stdin: tokio::sync::Mutex::new(Some(stdin)),
            child: tokio::sync::Mutex::new(Some(child)),
            shared,
            next_id: AtomicU64::new(1),
            started,
            shell_unavailable,
            _dir: dir,
        })
    }

    async fn launch_local(&self, opts: &LaunchOptions) -> Result<Kernel, KernelError> {
        self.local_launches.fetch_add(1, Ordering::Relaxed);
        self.local.launch(opts).await
    }

    /// One fork attempt. `Ok(None)`: the server is gone, retry.
    async fn try_fork(
        &self,
        plan: &Plan,
        server: &Server,
        opts: &LaunchOptions,
        started: Instant,
    ) -> Result<Option<Kernel>, ForkError> {
        if self.config.kernel_mode == KernelMode::Shell && server.shell_unavailable.is_none() {
            return self.try_fork_shell(plan, server, opts, started).await;
        }
        let mut conn = PreparedConnection::create(&plan.spec.name, opts.transport)
            .map_err(|e| ForkError::Failed(e.to_string()))?;
        let prefix = python_prefix(&self.local.python);
        let argv = plan
            .spec
            .expand_argv(&conn.connection_file, prefix.as_deref());
        let mut args: Vec<String> = argv.get(plan.split + 2..).unwrap_or_default().to_vec();
        // nbclient's ipython_hist_file default, as LocalLauncher passes it.
        args.push("--HistoryManager.hist_file=:memory:".into());
        args.extend(opts.extra_args.iter().cloned());
        conn.release_ports();
        let (pid, exit) = match server
            .fork(args, &plan.env, opts.cwd.as_ref(), opts.memory_limit_bytes)
            .await
        {
            Ok(x) => x,
            Err(ForkError::Gone) => return Ok(None),
            Err(e) => return Err(e),
        };
        let process = KernelProcess::external(pid, exit, self.local.kernels());
        tracing::debug!(pid, server = server.pid, "kernel forked");
        match conn.wait_ready(&process, opts).await {
            Ok((client, info)) => {
                self.forked.fetch_add(1, Ordering::Relaxed);
                Ok(Some(conn.into_kernel(
                    client,
                    process,
                    plan.spec.clone(),
                    info,
                    started.elapsed(),
                )))
            }
            Err(e) => {
                process.kill().await;
                Err(ForkError::Failed(e.to_string()))
            }
        }
    }
}

impl ForkServerLauncher {
    /// One fork of a shell (`python/om_shell.py`): a private socket in a fresh 0700 dir, the
    /// child forked to connect to it, the connection accepted only from that child's pid, then
    /// the usual kernel_info handshake. `Ok(None)`: the server is gone, retry.
    async fn try_fork_shell(
        &self,
        plan: &Plan,
        server: &Server,
        opts: &LaunchOptions,
        started: Instant,
    ) -> Result<Option<Kernel>, ForkError> {
        let dir =
            RuntimeDir::create().map_err(|e| ForkError::Failed(format!("runtime dir: {e}")))?;
        let path = dir.0.join("shell");
        let listener = tokio::net::UnixListener::bind(&path)
            .map_err(|e| ForkError::Failed(format!("shell socket {}: {e}", path.display())))?;
        let (pid, exit) = match server
            .fork_shell(&path, &plan.env, opts.cwd.as_ref(), opts.memory_limit_bytes)
            .await
        {
            Ok(x) => x,
            Err(ForkError::Gone) => return Ok(None),
            Err(e) => return Err(e),
        };
        let process = KernelProcess::external(pid, exit, self.local.kernels());
        tracing::debug!(pid, server = server.pid, "shell forked");
        let ready = async {
            let stream = loop {
                let (stream, _) = listener
                    .accept()
                    .await
                    .map_err(|e| KernelError::Transport(format!("shell socket accept: {e}")))?;
                match stream.peer_cred() {
                    Ok(cred) if cred.pid() == Some(pid) => break stream,
                    Ok(cred) => tracing::warn!(
                        expected = pid,
                        peer = ?cred.pid(),
                        "shell socket: connection from another process refused"
                    ),
                    Err(e) => tracing::warn!(error = %e, "shell socket: peer unknown, refused"),
                }
            };
            let mut client = KernelClient::over_socket(stream);
            let info = wait_ready(&mut client).await?;
            Ok::<_, KernelError>((client, info))
        };
        let result = tokio::select! {
            r = ready => r,
            status = process.exited() => Err(KernelError::Died(format!(
                "kernel exited during startup: {status}"))),
            _ = tokio::time::sleep(opts.startup_timeout) => Err(KernelError::Startup(format!(
                "kernel not ready after {:?}", opts.startup_timeout))),
        };
        drop(listener);
        match result {
            Ok((client, info)) => {
                self.forked.fetch_add(1, Ordering::Relaxed);
                Ok(Some(Kernel::assemble(
                    client,
                    process,
                    plan.spec.clone(),
                    info,
                    started.elapsed(),
                    path,
                    dir,
                )))
            }
            Err(e) => {
                process.kill().await;
                Err(ForkError::Failed(e.to_string()))
            }
        }
    }
}

#[async_trait]
impl KernelLauncher for ForkServerLauncher {
    async fn launch(&self, opts: &LaunchOptions) -> Result<Kernel, KernelError> {
        let started = Instant::now();
        let spec = self.local.resolve(&opts.kernel_name)?;
        let plan = match self.plan(&spec, &opts.env, opts.cwd.as_ref()) {
            Ok(p) => p,
            Err(why) => {
                tracing::debug!(kernel = %spec.name, why, "not forkable: local launch");
                return self.launch_local(opts).await;
            }
        };
        for _attempt in 0..2 {
            let server = match self.server_for(&plan).await {
                Ok(s) => s,
                Err(why) => {
                    tracing::debug!(%why, "fork server not used: local launch");
                    return self.launch_local(opts).await;
                }
            };
            match self.try_fork(&plan, &server, opts, started).await {
                Ok(Some(kernel)) => return Ok(kernel),
                Ok(None) => continue,
                Err(e) => {
                    // A kernel that died during start-up is the kernel's problem (same as a
                    // local start would report), anything else is the server's: go local.
                    if !server.alive() {
                        continue;
                    }
                    tracing::warn!(error = %e, "forked kernel failed; launching locally instead");
                    return self.launch_local(opts).await;
                }
            }
        }
        self.launch_local(opts).await
    }

    async fn shutdown(&self) {
        let server = {
            let mut slot = self.slot.lock().await;
            slot.disabled = Some("fork server shut down".into());
            slot.server.take()
        };
        if let Some(server) = server {
            server.stop().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn split_recognises_ipykernel_argv() {
        assert_eq!(
            ipykernel_split(&v(&[
                "/v/bin/python",
                "-m",
                "ipykernel_launcher",
                "-f",
                "x"
            ])),
            Some(1)
        );
        assert_eq!(
            ipykernel_split(&v(&[
                "/v/bin/python",
                "-Xfrozen_modules=off",
                "-m",
                "ipykernel_launcher",
                "-f",
                "x"
            ])),
            Some(2)
        );
        assert_eq!(
            ipykernel_split(&v(&["python", "wrapper.py", "-m", "ipykernel_launcher"])),
            None
        );
        assert_eq!(ipykernel_split(&v(&["-m", "ipykernel_launcher"])), None);
        assert_eq!(
            ipykernel_split(&v(&["R", "--slave", "-e", "IRkernel::main()"])),
            None
        );
    }

    #[test]
    fn events_parse_and_garbage_is_ignored() {
        assert!(matches!(
            parse_event(br#"{"event":"forked","id":3,"pid":42}"#),
            Some(Event::Forked { id: 3, pid: 42 })
        ));
        assert!(matches!(
            parse_event(br#"{"event":"exit","pid":42,"signal":9}"#),
            Some(Event::Exit {
                pid: 42,
                code: None,
                signal: Some(9)
            })
        ));
        assert!(parse_event(b"not json").is_none());
        assert!(parse_event(br#"{"event":"forked","id":"x"}"#).is_none());
        assert!(parse_event(br#"{"event":"bogus"}"#).is_none());
        assert!(parse_event(b"   ").is_none());
    }
}
