//! Kernel processes: own process group, exit watching, and a registry of live groups.
//!
//! Every kernel is started as the leader of a new process group, so one `killpg` reaches the
//! kernel and anything its cells spawned (subprocesses, multiprocessing workers). Three layers
//! make sure nothing outlives its job:
//! 1. [`KernelProcess::shutdown`]/[`KernelProcess::kill`] on the normal paths;
//! 2. a drop guard that SIGKILLs the group if a `KernelProcess` is dropped on any other path
//!    (panic, cancelled future);
//! 3. the global registry and [`kill_all_kernels`] for the worker's SIGTERM handler, because
//!    drop guards do not run when the process exits.
//!    In addition the launcher sets `JPY_PARENT_PID`, so ipykernel exits by itself within about a
//!    second if the worker dies by SIGKILL.

use std::collections::HashMap;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
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

fn registry() -> &'static Mutex<HashMap<u64, i32>> {
    static LIVE: OnceLock<Mutex<HashMap<u64, i32>>> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(HashMap::new()))
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// SIGKILLs the process groups of all kernels started by this process that are still live.
/// Meant for the worker's SIGTERM/SIGINT handler (drop guards do not run on `exit`). Returns how
/// many groups were signalled. Safe to call more than once and from any thread.
pub fn kill_all_kernels() -> usize {
    let groups: Vec<i32> = match registry().lock() {
        Ok(mut map) => map.drain().map(|(_, pgid)| pgid).collect(),
        Err(poisoned) => poisoned
            .into_inner()
            .drain()
            .map(|(_, pgid)| pgid)
            .collect(),
    };
    for pgid in &groups {
        let _ = killpg(Pid::from_raw(*pgid), Signal::SIGKILL);
    }
    groups.len()
}

/// Process-group ids of live kernels (for diagnostics and tests).
pub fn live_kernel_groups() -> Vec<i32> {
    match registry().lock() {
        Ok(map) => map.values().copied().collect(),
        Err(poisoned) => poisoned.into_inner().values().copied().collect(),
    }
}

/// A kernel process (group leader) with an exit watcher.
///
/// Either our own child ([`KernelProcess::adopt`]: a reaper task waits on it) or a process
/// someone else reaps ([`KernelProcess::external`]: a kernel forked by the fork server, whose
/// exit status arrives as a message). Both are signalled the same way, by process group.
#[derive(Debug)]
pub struct KernelProcess {
    id: u64,
    pid: i32,
    exit: watch::Receiver<Option<KernelExit>>,
    reaper: Option<tokio::task::JoinHandle<()>>,
}

impl KernelProcess {
    /// Takes ownership of a child started with `process_group(0)` and registers its group.
    pub fn adopt(mut child: Child) -> std::io::Result<Self> {
        let pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("kernel exited before it could be adopted"))?
            as i32;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut map) = registry().lock() {
            map.insert(id, pid);
        }
        let (tx, exit) = watch::channel(None);
        let reaper = tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(s) => KernelExit::from(s),
                Err(e) => KernelExit::Unknown(e.to_string()),
            };
            let _ = tx.send(Some(status));
        });
        Ok(KernelProcess {
            id,
            pid,
            exit,
            reaper: Some(reaper),
        })
    }

    /// A kernel that is not our child (it was forked by the fork server, which reaps it):
    /// `pid` must lead its own process group (the fork server's child calls `setsid()`), and
    /// `exit` must receive its status when it ends. Registers the group for
    /// [`kill_all_kernels`] like [`KernelProcess::adopt`].
    pub fn external(pid: i32, exit: watch::Receiver<Option<KernelExit>>) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut map) = registry().lock() {
            map.insert(id, pid);
        }
        KernelProcess {
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

    /// SIGKILLs the group and waits (bounded) for the leader to be reaped.
    pub async fn kill(&self) {
        let _ = self.signal_group(Signal::SIGKILL);
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
        if let Ok(mut map) = registry().lock() {
            map.remove(&self.id);
        }
    }
}

impl Drop for KernelProcess {
    fn drop(&mut self) {
        let registered = match registry().lock() {
            Ok(mut map) => map.remove(&self.id).is_some(),
            Err(_) => true,
        };
        if registered {
            // Abnormal path (no explicit kill): make sure the group dies. The reaper task keeps
            // running and reaps the leader.
            let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
        let _ = &self.reaper;
    }
}
