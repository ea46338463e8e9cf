//! `PooledLauncher` with real kernels (fork server inner, preloading only `json` so it starts
//! fast): isolation between tasks, refill, dead idle kernels replaced, bypass on other options,
//! clean shutdown. Plus an ignored latency bench (pool vs fork server vs plain launch).

#[path = "executor_common.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use om_worker::kernel::{
    ForkServerConfig, ForkServerLauncher, KernelLauncher, KernelMode, KernelTracker, LaunchOptions,
    LocalLauncher, PooledLauncher,
};
use om_worker::notebook::{Executor, ExecutorConfig, RunOptions};

const BOUND: Duration = Duration::from_secs(120);
const GONE: Duration = Duration::from_secs(15);

fn template() -> LaunchOptions {
    LaunchOptions {
        cwd: Some(std::env::temp_dir()),
        ..LaunchOptions::default()
    }
}

fn fork_launcher() -> Arc<ForkServerLauncher> {
    let mut c = ForkServerConfig::new(venv_python());
    c.default_preload = false;
    c.preload = vec!["json".into()];
    c.cwd = Some(std::env::temp_dir());
    Arc::new(ForkServerLauncher::new(c, KernelTracker::new()))
}

fn pool(size: usize) -> Arc<PooledLauncher> {
    Arc::new(PooledLauncher::new(fork_launcher(), template(), size))
}

fn pool_executor(pool: &Arc<PooledLauncher>) -> Executor {
    let mut c = ExecutorConfig::new(Arc::clone(pool) as Arc<dyn KernelLauncher>);
    c.cwd = Some(std::env::temp_dir());
    Executor::new(c)
}

fn stdout_of(o: &om_worker::notebook::RunOutcome, cell: usize) -> String {
    outputs(&o.notebook, cell)
        .iter()
        .filter(|v| v["name"] == "stdout")
        .filter_map(|v| v["text"].as_str())
        .collect()
}

#[tokio::test]
async fn state_of_one_task_is_absent_in_the_next_pooled_kernel() {
    let pool = pool(1);
    assert_eq!(pool.wait_ready(1, BOUND).await, 1, "{:?}", pool.stats());
    let exec = pool_executor(&pool);
    let (a, pid_a) = run_with(
        &exec,
        notebook(&["import os, sys, json, random\n\
             x = 1\n\
             json.x = 1\n\
             os.environ['X'] = '1'\n\
             sys.modules['om_marker'] = json\n\
             open('/dev/null').close()\n\
             random.seed(0)\n\
             print(random.random())"]),
        RunOptions::default(),
    )
    .await;
    assert!(a.error.is_none(), "{:?}", a.error);
    // The refill happened in the background; the next run gets the refilled kernel.
    assert!(pool.wait_ready(1, BOUND).await >= 1, "{:?}", pool.stats());
    let (b, pid_b) = run_with(
        &exec,
        notebook(&[
            "import os, sys, json, random\n\
             print('x' in globals(), hasattr(json, 'x'), os.environ.get('X'), 'om_marker' in sys.modules)\n\
             print(random.random())",
        ]),
        RunOptions::default(),
    )
    .await;
    assert!(b.error.is_none(), "{:?}", b.error);
    assert_ne!(pid_a, pid_b, "a kernel is never reused");
    let out = stdout_of(&b, 0);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("False False None False"), "{out}");
    let seeded0 = stdout_of(&a, 0);
    assert_ne!(
        lines.next(),
        Some(seeded0.trim()),
        "the next kernel's RNG is not the previous one's"
    );
    let stats = pool.stats();
    assert_eq!(stats.hits, 2, "{stats:?}");
    assert_eq!(stats.misses, 0, "{stats:?}");
    for pid in [pid_a, pid_b].into_iter().flatten() {
        assert!(wait_group_gone(pid, GONE).await.is_empty());
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn forked_kernels_do_not_share_random_state() {
    let pool = pool(2);
    assert_eq!(pool.wait_ready(2, BOUND).await, 2, "{:?}", pool.stats());
    let exec = pool_executor(&pool);
    let cell = "import random, uuid\nprint(random.random(), uuid.uuid4())";
    let (a, _) = run_with(&exec, notebook(&[cell]), RunOptions::default()).await;
    let (b, _) = run_with(&exec, notebook(&[cell]), RunOptions::default()).await;
    assert!(a.error.is_none() && b.error.is_none());
    assert_ne!(stdout_of(&a, 0), stdout_of(&b, 0));
    pool.shutdown().await;
}

#[tokio::test]
async fn pool_refills_and_replaces_a_kernel_that_died_idle() {
    let pool = pool(2);
    assert_eq!(pool.wait_ready(2, BOUND).await, 2, "{:?}", pool.stats());
    // Take one: the pool starts a replacement right away.
    let k = tokio::time::timeout(BOUND, pool.launch(&template()))
        .await
        .expect("bounded")
        .expect("take");
    assert!(k.is_alive());
    assert_eq!(pool.wait_ready(2, BOUND).await, 2, "{:?}", pool.stats());
    let taken = k.pid();
    k.shutdown(Duration::from_secs(2)).await;
    assert!(wait_group_gone(taken, GONE).await.is_empty());

    // An idle kernel dies (OOM killer, kill): it is discarded and replaced.
    let victim = pool.ready_pids()[0];
    killpg(Pid::from_raw(victim), Signal::SIGKILL).expect("kill idle kernel");
    let end = Instant::now() + BOUND;
    loop {
        let ready = pool.ready_pids();
        if ready.len() == 2 && !ready.contains(&victim) {
            break;
        }
        assert!(Instant::now() < end, "not replaced: {:?}", pool.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(pool.stats().discarded >= 1, "{:?}", pool.stats());
    assert!(wait_group_gone(victim, GONE).await.is_empty());
    pool.shutdown().await;
}

#[tokio::test]
async fn a_dead_kernel_is_never_handed_out() {
    let pool = pool(2);
    assert_eq!(pool.wait_ready(2, BOUND).await, 2, "{:?}", pool.stats());
    let pids = pool.ready_pids();
    // Kill both and take at once (before the 1 s sweep may notice): the exit reports arrive
    // within milliseconds, the take health-checks and falls through to a direct launch.
    for p in &pids {
        killpg(Pid::from_raw(*p), Signal::SIGKILL).expect("kill");
    }
    for p in &pids {
        assert!(wait_group_gone(*p, GONE).await.is_empty());
    }
    let k = tokio::time::timeout(BOUND, pool.launch(&template()))
        .await
        .expect("bounded")
        .expect("launch");
    assert!(k.is_alive());
    assert!(!pids.contains(&k.pid()));
    k.shutdown(Duration::from_secs(2)).await;
    pool.shutdown().await;
}

#[tokio::test]
async fn other_options_bypass_the_pool() {
    let pool = pool(1);
    assert_eq!(pool.wait_ready(1, BOUND).await, 1);
    let idle = pool.ready_pids();
    let other = tempfile::tempdir().expect("tempdir");
    let opts = LaunchOptions {
        cwd: Some(other.path().to_path_buf()),
        ..LaunchOptions::default()
    };
    let k = tokio::time::timeout(BOUND, pool.launch(&opts))
        .await
        .expect("bounded")
        .expect("launch");
    assert!(!idle.contains(&k.pid()));
    assert_eq!(
        pool.ready_pids(),
        idle,
        "the idle kernel stays for a matching task"
    );
    let s = pool.stats();
    assert_eq!((s.hits, s.misses), (0, 1));
    k.shutdown(Duration::from_secs(2)).await;
    pool.shutdown().await;
}

#[tokio::test]
async fn shutdown_kills_idle_kernels_and_stops_refilling() {
    let pool = pool(2);
    assert_eq!(pool.wait_ready(2, BOUND).await, 2);
    let pids = pool.ready_pids();
    pool.shutdown().await;
    for p in &pids {
        assert!(
            wait_group_gone(*p, GONE).await.is_empty(),
            "idle kernel {p} left"
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = pool.stats();
    assert_eq!((s.ready, s.starting), (0, 0), "{s:?}");
}

#[tokio::test]
async fn pool_over_the_local_launcher() {
    let pool = Arc::new(PooledLauncher::new(
        Arc::new(LocalLauncher::new(venv_python(), KernelTracker::new())),
        template(),
        1,
    ));
    assert_eq!(pool.wait_ready(1, BOUND).await, 1);
    let (o, pid) = run_with(
        &pool_executor(&pool),
        notebook(&["print(1 + 1)"]),
        RunOptions::default(),
    )
    .await;
    assert!(o.error.is_none(), "{:?}", o.error);
    assert_eq!(stdout_of(&o, 0), "2\n");
    assert!(wait_group_gone(pid.expect("pid"), GONE).await.is_empty());
    assert_eq!(pool.stats().hits, 1);
    pool.shutdown().await;
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Kernel-ready latency and ready + first omegaml cell, 7 samples each:
/// `cargo test --release --test kernel_pool -- --ignored --nocapture bench_kernel_ready`
#[tokio::test]
#[ignore]
async fn bench_kernel_ready_latency() {
    const N: usize = 7;
    // A cell that pays omegaml's import and lazy setup (no database I/O).
    let cell = "import omegaml as om\nrt = om.runtime";
    let opts = template();

    async fn sample(launcher: &dyn KernelLauncher, opts: &LaunchOptions) -> Duration {
        let t = Instant::now();
        let k = launcher.launch(opts).await.expect("launch");
        let ready = t.elapsed();
        k.shutdown(Duration::ZERO).await;
        ready
    }

    // Ready latency.
    let local = LocalLauncher::new(venv_python(), KernelTracker::new());
    let fork_server = |mode: KernelMode| {
        let mut fs_cfg = ForkServerConfig::new(venv_python());
        fs_cfg.cwd = Some(std::env::temp_dir());
        fs_cfg.kernel_mode = mode;
        Arc::new(ForkServerLauncher::new(fs_cfg, KernelTracker::new()))
    };
    let fork = fork_server(KernelMode::Ipykernel);
    let shell = fork_server(KernelMode::Shell);
    for (mode, server) in [("ipykernel", &fork), ("shell", &shell)] {
        let t = Instant::now();
        server.start().await.expect("fork server");
        println!(
            "fork server start (omegaml preload, {mode}): {:?}",
            t.elapsed()
        );
    }
    let pool = Arc::new(PooledLauncher::new(
        Arc::clone(&fork) as Arc<dyn KernelLauncher>,
        opts.clone(),
        1,
    ));

    let mut results = Vec::new();
    for (name, launcher) in [
        ("plain launch", &local as &dyn KernelLauncher),
        ("fork server: app", fork.as_ref() as &dyn KernelLauncher),
        ("fork server: shell", shell.as_ref() as &dyn KernelLauncher),
        ("pool (app)", pool.as_ref() as &dyn KernelLauncher),
    ] {
        let mut ready = Vec::new();
        for _ in 0..N {
            if name.starts_with("pool") {
                pool.wait_ready(1, BOUND).await;
            }
            ready.push(sample(launcher, &opts).await);
        }
        // Ready + the omegaml cell, through the executor.
        let mut c = ExecutorConfig::new(match name {
            "plain launch" => Arc::new(LocalLauncher::new(venv_python(), KernelTracker::new()))
                as Arc<dyn KernelLauncher>,
            "fork server: app" => Arc::clone(&fork) as Arc<dyn KernelLauncher>,
            "fork server: shell" => Arc::clone(&shell) as Arc<dyn KernelLauncher>,
            _ => Arc::clone(&pool) as Arc<dyn KernelLauncher>,
        });
        c.cwd = Some(std::env::temp_dir());
        let exec = Executor::new(c);
        let mut total = Vec::new();
        let mut cells = Vec::new();
        for _ in 0..N {
            if name.starts_with("pool") {
                pool.wait_ready(1, BOUND).await;
            }
            let t = Instant::now();
            let (o, _) = run_with(&exec, notebook(&[cell]), RunOptions::default()).await;
            assert!(o.error.is_none(), "{:?}", o.error);
            total.push(t.elapsed());
            cells.push(o.timings.cells[0].duration);
        }
        results.push((name, median(ready), median(cells), median(total)));
    }
    println!(
        "\nmedians of {N}: kernel ready | cell `import omegaml as om; om.runtime` | \
         executor run (launch + cell + shutdown)"
    );
    for (name, r, c, t) in results {
        println!(
            "  {name:<20} {:>8.1} ms | {:>8.1} ms | {:>8.1} ms",
            r.as_secs_f64() * 1e3,
            c.as_secs_f64() * 1e3,
            t.as_secs_f64() * 1e3
        );
    }
    pool.shutdown().await;
}
