//! Shared helpers for the executor integration tests (included with `#[path]`; this file also
//! builds as its own empty test target).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::{Arc, Mutex};

use om_worker::kernel::{
    ForkServerConfig, ForkServerLauncher, Kernel, KernelEnv, KernelError, KernelLauncher,
    KernelMode, KernelTracker, LaunchOptions,
};
use om_worker::notebook::{
    Cell, Executor, ExecutorConfig, Notebook, Progress, RunOptions, RunOutcome,
};
use tokio::sync::mpsc;

/// Which kernel the executor tests run against (see [`on_both_paths!`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    /// A real ipykernel app in its own process (`python -m ipykernel_launcher`).
    Ipykernel,
    /// om-worker's default: ipykernel's shell forked from the fork server, over one socket.
    Shell,
}

tokio::task_local! {
    static PATH: KernelPath;
}

/// The path of the running test ([`KernelPath::Ipykernel`] outside [`on_both_paths!`]).
pub fn kernel_path() -> KernelPath {
    PATH.try_with(|p| *p).unwrap_or(KernelPath::Ipykernel)
}

/// Runs `body` with [`config`] building executors for `path`.
pub async fn with_path<F: std::future::Future<Output = ()>>(path: KernelPath, body: F) {
    PATH.scope(path, body).await
}

/// Defines the test once per kernel path: `mod NAME { fn ipykernel(); fn shell(); }`. Every
/// executor built by [`config`]/[`tracked_config`] inside the body uses that path; on the shell
/// path a run that did not get a forked shell fails (no silent fallback to a plain kernel).
#[macro_export]
macro_rules! on_both_paths {
    ($(#[$meta:meta])* async fn $name:ident() $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test]
            async fn ipykernel() {
                with_path(KernelPath::Ipykernel, async $body).await
            }

            #[tokio::test]
            async fn shell() {
                with_path(KernelPath::Shell, async $body).await
            }
        }
    };
}

/// The env and cwd a fork server was started with.
type ServerKey = (KernelEnv, Option<PathBuf>);

/// The shell path's launcher: one fork server (shell mode, no omegaml preload) per env/cwd a
/// test runs with, so that tests that set their own environment or cwd are forked too. Every
/// kernel it hands out must be a forked shell.
pub struct ShellLauncher {
    kernels: KernelTracker,
    servers: Mutex<Vec<(ServerKey, Arc<ForkServerLauncher>)>>,
}

impl ShellLauncher {
    pub fn new(kernels: KernelTracker) -> Self {
        ShellLauncher {
            kernels,
            servers: Mutex::new(Vec::new()),
        }
    }

    fn server(&self, opts: &LaunchOptions) -> Arc<ForkServerLauncher> {
        let key = (opts.env.clone(), opts.cwd.clone());
        let mut servers = self.servers.lock().unwrap();
        if let Some((_, s)) = servers.iter().find(|(k, _)| *k == key) {
            return Arc::clone(s);
        }
        let mut fs = ForkServerConfig::new(venv_python());
        fs.default_preload = false;
        fs.env = opts.env.clone();
        fs.cwd = opts.cwd.clone();
        fs.kernel_mode = KernelMode::Shell;
        fs.task_spares = false;
        let server = Arc::new(ForkServerLauncher::new(fs, self.kernels.clone()));
        servers.push((key, Arc::clone(&server)));
        server
    }
}

#[async_trait::async_trait]
impl KernelLauncher for ShellLauncher {
    async fn launch(&self, opts: &LaunchOptions) -> Result<Kernel, KernelError> {
        let server = self.server(opts);
        let kernel = server.launch(opts).await?;
        let stats = server.stats();
        if stats.local > 0 || !kernel.connection_file.ends_with("shell") {
            return Err(KernelError::Startup(format!(
                "test expected a forked shell, got {} ({stats:?})",
                kernel.connection_file.display()
            )));
        }
        Ok(kernel)
    }

    async fn shutdown(&self) {
        let servers: Vec<_> = self
            .servers
            .lock()
            .unwrap()
            .drain(..)
            .map(|(_, s)| s)
            .collect();
        for s in servers {
            s.shutdown().await;
        }
    }
}

/// The pinned venv's python. Missing venv is a hard failure, never a skip.
pub fn venv_python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup-venv.sh (the executor tests need a real ipykernel)",
        p.display()
    );
    p
}

/// Local kernels of the venv python in the temp dir, registered in a tracker of their own.
pub fn config() -> ExecutorConfig {
    tracked_config(KernelTracker::new())
}

/// [`config`] registering its kernels in `kernels`, for the test's [`kernel_path`].
pub fn tracked_config(kernels: KernelTracker) -> ExecutorConfig {
    let mut c = match kernel_path() {
        KernelPath::Ipykernel => ExecutorConfig::local(venv_python(), kernels),
        KernelPath::Shell => ExecutorConfig::new(Arc::new(ShellLauncher::new(kernels))),
    };
    c.cwd = Some(std::env::temp_dir());
    c
}

pub fn executor() -> Executor {
    Executor::new(config())
}

pub fn notebook(cells: &[&str]) -> Notebook {
    let mut nb = Notebook::default();
    nb.metadata.insert(
        "kernelspec".into(),
        serde_json::json!({"name": "python3", "display_name": "Python 3", "language": "python"}),
    );
    nb.cells = cells.iter().map(|s| Cell::code(*s)).collect();
    nb
}

/// Runs with a hard test-side bound and collects progress; returns the outcome and the kernel pid.
pub async fn run_with(
    exec: &Executor,
    nb: Notebook,
    mut opts: RunOptions,
) -> (RunOutcome, Option<i32>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    opts.progress = Some(tx);
    let outcome = tokio::time::timeout(Duration::from_secs(120), exec.run(nb, opts))
        .await
        .expect("executor run exceeded the 120 s test bound");
    let mut pid = None;
    while let Ok(p) = rx.try_recv() {
        if let Progress::KernelReady { pid: p, .. } = p {
            pid = Some(p);
        }
    }
    (outcome, pid)
}

pub async fn run(nb: Notebook) -> (RunOutcome, Option<i32>) {
    run_with(&executor(), nb, RunOptions::default()).await
}

/// Pids of live (non-zombie) processes whose process group is `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // fields after the ")" of comm: state ppid pgrp ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 2 && f[2] == pgid.to_string() && f[0] != "Z" {
            out.push(pid);
        }
    }
    out
}

/// Waits (bounded) until no process of group `pgid` is left; returns the survivors.
pub async fn wait_group_gone(pgid: i32, within: Duration) -> Vec<i32> {
    let end = std::time::Instant::now() + within;
    loop {
        let m = group_members(pgid);
        if m.is_empty() || std::time::Instant::now() > end {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Pids whose command line contains `needle`.
pub fn procs_with_cmdline(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(needle) {
                out.push(pid);
            }
        }
    }
    out
}

/// Writes the notebook and validates it with Python's nbformat (panics with its message).
pub fn nbformat_validate(nb: &Notebook) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nb.ipynb");
    nb.write(&path).expect("write");
    let out = std::process::Command::new(venv_python())
        .args([
            "-c",
            "import sys, nbformat; nb = nbformat.read(sys.argv[1], as_version=4); nbformat.validate(nb); \
             s = open(sys.argv[1], encoding='utf-8').read(); w = nbformat.writes(nb) + '\\n'; \
             sys.exit(0 if s == w else 'not byte-identical to nbformat.writes')",
        ])
        .arg(&path)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "nbformat rejected our notebook: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn outputs(nb: &Notebook, i: usize) -> &Vec<serde_json::Value> {
    &nb.cells[i].outputs
}
