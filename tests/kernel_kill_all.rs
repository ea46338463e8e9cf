//! `KernelTracker::kill_all` reaches forked kernels and idle pooled kernels too (own test
//! binary, as when it killed every kernel of the process).

#[path = "executor_common.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use om_worker::kernel::{
    ForkServerConfig, ForkServerLauncher, KernelLauncher, KernelTracker, LaunchOptions,
    PooledLauncher,
};

#[tokio::test]
async fn kill_all_kernels_reaches_forked_and_pooled_kernels() {
    let mut c = ForkServerConfig::new(venv_python());
    c.default_preload = false;
    c.cwd = Some(std::env::temp_dir());
    let kernels = KernelTracker::new();
    let fork = Arc::new(ForkServerLauncher::new(c, kernels.clone()));
    let opts = LaunchOptions {
        cwd: Some(std::env::temp_dir()),
        ..LaunchOptions::default()
    };
    let busy = tokio::time::timeout(Duration::from_secs(120), fork.launch(&opts))
        .await
        .expect("bounded")
        .expect("forked kernel");
    let pool = PooledLauncher::new(Arc::clone(&fork) as Arc<dyn KernelLauncher>, opts, 2);
    assert_eq!(pool.wait_ready(2, Duration::from_secs(120)).await, 2);
    // Stop refills first (as the worker does), then the sweep.
    let mut pids = pool.ready_pids();
    pids.push(busy.pid());
    for p in &pids {
        assert!(kernels.live_groups().contains(p));
    }
    assert!(kernels.kill_all() >= 3);
    for p in &pids {
        let left = wait_group_gone(*p, Duration::from_secs(15)).await;
        assert!(left.is_empty(), "kernel {p} survived kill_all: {left:?}");
    }
    let exit = tokio::time::timeout(Duration::from_secs(15), busy.process.exited())
        .await
        .expect("death of the forked kernel reported");
    assert_eq!(exit, om_worker::kernel::KernelExit::Signal(9));
    pool.shutdown().await;
}
