//! Kernel processes: own process group, exit watching, and a tracker of live groups.
//!
//! Every kernel is started as the leader of a new process group, so one `killpg` reaches the
//! kernel and anything its cells spawned (subprocesses, multiprocessing workers). Three layers
//! make sure nothing outlives its job:
//! 1. [`KernelProcess::shutdown`]/[`KernelProcess::kill`] on the normal paths;
//! 2. a drop guard that SIGKILLs the group if a `KernelProcess` is dropped on any other path
//!    (panic, cancelled future);
//! 3. a [`KernelTracker`] and its [`KernelTracker::kill_all`] for the owner's shutdown and
//!    SIGTERM paths, because drop guards do not run when the process exits. The owner (the
//!    worker's notebook runtime, `run-notebook`) creates the tracker and hands it to the
//!    launchers it builds; every kernel they start registers in it.
//!    In addition the launcher sets `JPY_PARENT_PID`, so ipykernel exits by itself within about a
//!    second if the worker dies by SIGKILL.

use std::collections::HashMap;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::sync::watch;

/// How a kernel process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelExit {
    /// Exited with a status code (e.g. `os._exit(1)`).
    Code(i32),
    /// Killed by a signal (9 = SIGKILL, e.g. the OOM killer).
    Signal(i32),
    /// `wait` itself failed.
    Unknown(String),
}

impl std::fmt::Display for KernelExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelExit::Code(c) => write!(f, "exit status {c}"),
            KernelExit::Signal(9) => write!(f, "killed by SIGKILL (out of memory?)"),
            KernelExit::Signal(s) => write!(f, "killed by signal {s}"),
            KernelExit::Unknown(e) => write!(f, "unknown exit ({e})"),
        }
    }
}

impl From<ExitStatus> for KernelExit {
    fn from(status: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(c), _) => KernelExit::Code(c),
            (None, Some(s)) => KernelExit::Signal(s),
            _ => KernelExit::Unknown(format!("{status:?}")),
        }
    }
}

/// The process groups of the live kernels started through the launchers that share it.
///
/// Exists because drop guards do not run when the process exits: whoever owns the kernels
/// (the worker's notebook runtime, `run-notebook`) calls [`KernelTracker::kill_all`] on its way
/// out (after a SIGTERM too), so no kernel outlives it. Created by that owner and passed to the
/// launchers at construction ([`super::LocalLauncher::new`],
/// [`super::ForkServerLauncher::new`]); a pool reaches its kernels through the launcher it wraps.
/// Cheap to clone; clones share the same set.
#[derive(Debug, Clone, Default)]
pub struct KernelTracker {
    inner: Arc<TrackerInner>,
}

#[derive(Debug, Default)]
struct TrackerInner {
    /// Registration id → process group id. Ids, not pgids, are the keys: a pgid can be reused
    /// by the OS once its group is gone and a stale entry must not unregister a new kernel.
    live: Mutex<HashMap<u64, i32>>,
    next_id: AtomicU64,
}

impl KernelTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        KernelTracker::default()
    }

    fn live(&self) -> MutexGuard<'_, HashMap<u64, i32>> {
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, pgid: i32) -> u64 {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.live().insert(id, pgid);
        id
    }

    /// Forgets registration `id`; true when it was still registered.
    fn unregister(&self, id: u64) -> bool {
        self.live().remove(&id).is_some()
    }

    /// SIGKILLs the process groups of all tracked kernels that are still live and forgets them.
    /// Meant for the owner's shutdown and SIGTERM/SIGINT paths (drop guards do not run on
    /// `exit`). Returns how many groups were signalled. Safe to call more than once and from
    /// any thread.
    pub fn kill_all(&self) -> usize {
        let groups: Vec<i32> = self.live().drain().map(|(_, pgid)| pgid).collect();
        for pgid in &groups {
            kill_tree(*pgid);
        }
        groups.len()
    }

    /// Process-group ids of the tracked live kernels (for diagnostics and tests).
    pub fn live_groups(&self) -> Vec<i32> {
        self.live().values().copied().collect()
    }
}

/// A kernel process (group leader) with an exit watcher.
///
/// Either our own child ([`KernelProcess::adopt`]: a reaper task waits on it) or a process
/// someone else reaps ([`KernelProcess::external`]: a kernel forked by the fork server, whose
/// exit status arrives as a message). Both are signalled the same way, by process group.
#[derive(Debug)]
pub struct KernelProcess {
    tracker: KernelTracker,
    id: u64,
    pid: i32,
    exit: watch::Receiver<Option<KernelExit>>,
    reaper: Option<tokio::task::JoinHandle<()>>,
}

impl KernelProcess {
    /// Takes ownership of a child started with `process_group(0)` and registers its group in
    /// `tracker`.
    pub fn adopt(mut child: Child, tracker: &KernelTracker) -> std::io::Result<Self> {
        let pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("kernel exited before it could be adopted"))?
            as i32;
        let id = tracker.register(pid);
        let (tx, exit) = watch::channel(None);
        let reaper = tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(s) => KernelExit::from(s),
                Err(e) => KernelExit::Unknown(e.to_string()),
            };
            let _ = tx.send(Some(status));
        });
        Ok(KernelProcess {
            tracker: tracker.clone(),
            id,
            pid,
            exit,
            reaper: Some(reaper),
        })
    }

    /// A kernel that is not our child (it was forked by the fork server, which reaps it):
    /// `pid` must lead its own process group (the fork server's child calls `setsid()`), and
    /// `exit` must receive its status when it ends. Registers the group in `tracker` like
    /// [`KernelProcess::adopt`].
    pub fn external(
        pid: i32,
        exit: watch::Receiver<Option<KernelExit>>,
        tracker: &KernelTracker,
    ) -> Self {
        let id = tracker.register(pid);
        KernelProcess {
            tracker: tracker.clone(),
            id,
            pid,
            exit,
            reaper: None,
        }
    }

    /// True while no exit status is known and the pid still exists (not a zombie). Used to
    /// health-check idle pooled kernels before handing them out.
    pub fn is_alive(&self) -> bool {
        if self.exit_status().is_some() {
            return false;
        }
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X"),
            Err(_) => false,
        }
    }

    /// Pid of the kernel (= its process group id).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The exit status once the kernel has exited.
    pub fn exit_status(&self) -> Option<KernelExit> {
        self.exit.borrow().clone()
    }

    /// Resolves when the kernel process exits (immediately if it already has).
    pub async fn exited(&self) -> KernelExit {
        let mut rx = self.exit.clone();
        loop {
            if let Some(status) = rx.borrow_and_update().clone() {
                return status;
            }
            if rx.changed().await.is_err() {
                // Reaper gone without a status (runtime shutting down).
                return rx
                    .borrow()
                    .clone()
                    .unwrap_or_else(|| KernelExit::Unknown("reaper stopped".into()));
            }
        }
    }

    /// Sends a signal to the whole process group.
    pub fn signal_group(&self, signal: Signal) -> nix::Result<()> {
        killpg(Pid::from_raw(self.pid), signal)
    }

    /// SIGKILLs the kernel's whole process tree (see [`kill_tree`]) and waits
    /// (bounded) for the leader to be reaped.
    pub async fn kill(&self) {
        kill_tree(self.pid);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.exited()).await;
        self.unregister();
    }

    /// Waits up to `grace` for a voluntary exit, then SIGKILLs the group. The group is killed in
    /// both cases, so subprocesses the kernel left behind die too.
    pub async fn shutdown(&self, grace: Duration) {
        let _ = tokio::time::timeout(grace, self.exited()).await;
        self.kill().await;
    }

    fn unregister(&self) {
        self.tracker.unregister(self.id);
    }
}

impl Drop for KernelProcess {
    fn drop(&mut self) {
        // Still registered: nobody killed it, and `kill_all` has not signalled its group either
        // (it forgets what it signals, so a reused pgid is never hit twice).
        if self.tracker.unregister(self.id) {
            // Abnormal path (no explicit kill): make sure the tree dies. The reaper task keeps
            // running and reaps the leader.
            kill_tree(self.pid);
        }
        let _ = &self.reaper;
    }
}

/// Rounds of [`kill_tree`]: each kills what the previous one found; a
/// process that forks faster than that is still stopped, and its group and
/// any orphan end up with the fork server, which kills what it adopts.
const KILL_TREE_ROUNDS: usize = 20;

/// SIGKILLs `root`, its process group and every process below it, whatever
/// session or group they moved to. The fork server makes each child the
/// subreaper of its own tree (`PR_SET_CHILD_SUBREAPER`), so while `root`
/// lives, everything a task started and orphaned (`start_new_session`
/// daemons, double forks) is still below it. `root` and its group are
/// stopped first so they cannot fork while the tree is walked; the walk
/// reads `/proc/<pid>/task/<tid>/children`. Best effort: every error is a
/// process already gone.
pub fn kill_tree(root: i32) {
    if root <= 1 {
        return;
    }
    if !leads_own_group(root) {
        // Gone (or the pid now names an unrelated process): only the group is left to end.
        let _ = killpg(Pid::from_raw(root), Signal::SIGKILL);
        return;
    }
    let _ = killpg(Pid::from_raw(root), Signal::SIGSTOP);
    let _ = nix::sys::signal::kill(Pid::from_raw(root), Signal::SIGSTOP);
    let mut killed = std::collections::HashSet::new();
    for _ in 0..KILL_TREE_ROUNDS {
        let found: Vec<i32> = descendants(root)
            .into_iter()
            .filter(|p| !killed.contains(p))
            .collect();
        if found.is_empty() {
            break;
        }
        for pid in found {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            killed.insert(pid);
        }
    }
    let _ = killpg(Pid::from_raw(root), Signal::SIGKILL);
    let _ = nix::sys::signal::kill(Pid::from_raw(root), Signal::SIGKILL);
}

/// True when `pid` exists, is not a zombie and leads its own process group
/// (as every kernel and task child does): a reused pid is not walked.
fn leads_own_group(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let mut fields = rest.split_whitespace();
    let state = fields.next();
    let pgrp = fields.nth(1).and_then(|f| f.parse::<i32>().ok());
    !matches!(state, None | Some("Z") | Some("X")) && pgrp == Some(pid)
}

/// The pids below `pid` (children, their children, ...), from
/// `/proc/<pid>/task/<tid>/children`; empty when `pid` is gone.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let path = task.path().join("children");
            let Ok(list) = std::fs::read_to_string(path) else {
                continue;
            };
            for child in list
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
            {
                // A cycle is impossible in a process tree; the bound is for a racing pid reuse.
                if child > 1 && !out.contains(&child) && out.len() < 100_000 {
                    out.push(child);
                    todo.push(child);
                }
            }
        }
    }
    out
}
