//! `KernelTracker::kill_all` (the worker's SIGTERM path), in its own test binary as when it
//! killed every kernel of the process, including those of tests running in parallel.

#[path = "executor_common.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use om_worker::kernel::KernelTracker;
use om_worker::notebook::Executor;
use om_worker::notebook::{Progress, RunError, RunOptions};
use tokio::sync::mpsc;

const GONE: Duration = Duration::from_secs(10);

on_both_paths! {
async fn kill_all_kernels_stops_a_running_notebook() {
    let kernels = KernelTracker::new();
    let exec = Executor::new(tracked_config(kernels.clone()));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let opts = RunOptions {
        progress: Some(tx),
        ..Default::default()
    };
    let nb = notebook(&["import time\ntime.sleep(300)"]);
    let run = tokio::spawn(async move { exec.run(nb, opts).await });
    let mut pid = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Some(p) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .ok()
        .flatten()
    {
        match p {
            Progress::KernelReady { pid: p, .. } => pid = Some(p),
            Progress::CellStarted { .. } => break,
            _ => {}
        }
        assert!(Instant::now() < deadline);
    }
    let pid = pid.expect("kernel started");
    assert!(!group_members(pid).is_empty());
    assert!(kernels.live_groups().contains(&pid));
    assert!(kernels.kill_all() >= 1);
    assert!(kernels.live_groups().is_empty());
    let o = tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .expect("run ended after kill_all")
        .expect("join");
    assert!(
        matches!(o.error, Some(RunError::KernelDied { .. })),
        "{:?}",
        o.error
    );
    assert!(wait_group_gone(pid, GONE).await.is_empty());
}
}
