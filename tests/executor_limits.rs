//! Limits, kernel death and process cleanup against a real ipykernel (pinned venv; run
//! scripts/setup-venv.sh). Time bounds are deliberately generous (CI has 2 cores).

#[path = "executor_common.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use om_worker::notebook::{Executor, Progress, RunError, RunOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const GONE: Duration = Duration::from_secs(10);

fn stream_bytes(o: &om_worker::notebook::RunOutcome, cell: usize) -> usize {
    o.notebook.cells[cell]
        .outputs
        .iter()
        .map(|o| o["text"].as_str().map_or(0, str::len))
        .sum()
}

fn has_marker(o: &om_worker::notebook::RunOutcome, cell: usize) -> bool {
    o.notebook.cells[cell].outputs.iter().any(|o| {
        o["text"]
            .as_str()
            .is_some_and(|t| t.contains("[om-worker: output truncated after"))
    })
}

on_both_paths! {
async fn ten_megabyte_flood_is_capped() {
    let mut c = config();
    c.max_cell_output_bytes = 1024 * 1024;
    let nb = notebook(&[
        "import sys\nline = 'x' * 999 + '\\n'\nfor _ in range(10_000):\n    sys.stdout.write(line)\nprint('done-marker')",
        "print('next cell still runs')",
    ]);
    let (o, pid) = run_with(&Executor::new(c), nb, RunOptions::default()).await;
    assert!(o.is_ok(), "{:?}", o.error);
    assert!(o.output_truncated);
    let b = stream_bytes(&o, 0);
    assert!(b <= 1024 * 1024 + 512, "kept {b} bytes");
    assert!(b >= 1000 * 1000, "kept only {b} bytes");
    assert!(has_marker(&o, 0));
    assert!(!serde_json::to_string(&o.notebook.cells[0].outputs)
        .unwrap_or_default()
        .contains("done-marker"));
    assert_eq!(
        o.notebook.cells[1].outputs[0]["text"],
        "next cell still runs\n"
    );
    nbformat_validate(&o.notebook);
    assert!(wait_group_gone(pid.expect("pid"), GONE).await.is_empty());
}
}

on_both_paths! {
async fn default_cap_and_notebook_cap() {
    // default per-cell cap (10 MiB) against a 12 MB flood
    let nb =
        notebook(&["import sys\nfor _ in range(12_000):\n    sys.stdout.write('y' * 999 + '\\n')"]);
    let (o, _) = run(nb).await;
    assert!(o.is_ok(), "{:?}", o.error);
    let b = stream_bytes(&o, 0);
    assert!(b <= 10 * 1024 * 1024 + 512 && b > 10_000_000, "kept {b}");
    assert!(has_marker(&o, 0));

    // notebook-wide cap across cells
    let mut c = config();
    c.max_total_output_bytes = 1_500_000;
    let cell = "print('z' * 999_999)";
    let (o, _) = run_with(
        &Executor::new(c),
        notebook(&[cell, cell, cell]),
        RunOptions::default(),
    )
    .await;
    assert!(o.is_ok(), "{:?}", o.error);
    assert_eq!(stream_bytes(&o, 0), 1_000_000);
    assert!(has_marker(&o, 1));
    assert!(stream_bytes(&o, 1) < 600_000);
    assert!(has_marker(&o, 2));
}
}

on_both_paths! {
async fn infinite_loop_hits_cell_timeout_and_is_interrupted() {
    let nb = notebook(&["x = 1", "while True:\n    pass", "print('never')"]);
    let opts = RunOptions {
        cell_timeout: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let t = Instant::now();
    let (o, pid) = run_with(&executor(), nb, opts).await;
    match &o.error {
        Some(RunError::CellTimeout {
            cell_index: 1,
            message,
            ..
        }) => {
            assert!(message
                .starts_with("A cell timed out while it was being executed, after 2 seconds."))
        }
        other => panic!("expected CellTimeout, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(30));
    // the interrupt surfaced as KeyboardInterrupt in the cell's outputs
    assert!(
        o.notebook.cells[1]
            .outputs
            .iter()
            .any(|x| x["ename"] == "KeyboardInterrupt"),
        "{:?}",
        o.notebook.cells[1].outputs
    );
    assert!(o.notebook.cells[2].outputs.is_empty());
    nbformat_validate(&o.notebook);
    assert!(
        wait_group_gone(pid.expect("pid"), GONE).await.is_empty(),
        "orphan after timeout"
    );
}
}

on_both_paths! {
async fn whole_run_timeout_kills_an_uninterruptible_cell() {
    // SIGINT is ignored by the cell, so the run must end by killing the kernel.
    let nb = notebook(&["import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.1)"]);
    let mut c = config();
    c.interrupt_grace = Duration::from_secs(1);
    let opts = RunOptions {
        timeout: Some(Duration::from_secs(4)),
        ..Default::default()
    };
    let t = Instant::now();
    let (o, pid) = run_with(&Executor::new(c), nb, opts).await;
    assert!(
        matches!(
            o.error,
            Some(RunError::RunTimeout {
                cell_index: Some(0),
                ..
            })
        ),
        "{:?}",
        o.error
    );
    assert!(t.elapsed() < Duration::from_secs(30));
    assert!(
        wait_group_gone(pid.expect("pid"), GONE).await.is_empty(),
        "orphan after run timeout"
    );
}
}

on_both_paths! {
async fn os_exit_is_reported_as_kernel_death_quickly() {
    let nb = notebook(&["print('alive')", "import os\nos._exit(1)", "print('never')"]);
    let t = Instant::now();
    let (o, pid) = run(nb).await;
    let elapsed = t.elapsed();
    match &o.error {
        Some(RunError::KernelDied {
            cell_index: Some(1),
            exit,
        }) => assert!(exit.contains("exit status 1"), "{exit}"),
        other => panic!("expected KernelDied, got {other:?}"),
    }
    assert!(
        elapsed < Duration::from_secs(10),
        "death detected after {elapsed:?}"
    );
    assert_eq!(o.notebook.cells[0].outputs[0]["text"], "alive\n");
    nbformat_validate(&o.notebook);
    assert!(wait_group_gone(pid.expect("pid"), GONE).await.is_empty());
}
}

on_both_paths! {
async fn sigkill_of_the_kernel_is_reported() {
    let nb = notebook(&["import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"]);
    let (o, _) = run(nb).await;
    match &o.error {
        Some(RunError::KernelDied { exit, .. }) => assert!(exit.contains("SIGKILL"), "{exit}"),
        other => panic!("expected KernelDied, got {other:?}"),
    }
}
}

on_both_paths! {
async fn no_orphans_after_success_even_with_subprocesses() {
    let tag = format!("sleep {}", 1000 + std::process::id() % 1000);
    let nb = notebook(&[&format!(
        "import subprocess\np = subprocess.Popen(['sh', '-c', '{tag}'])\nprint(p.pid)"
    )]);
    let (o, pid) = run(nb).await;
    assert!(o.is_ok(), "{:?}", o.error);
    let pid = pid.expect("pid");
    assert!(
        wait_group_gone(pid, GONE).await.is_empty(),
        "kernel group survived"
    );
    assert!(
        procs_with_cmdline(&tag).is_empty(),
        "subprocess of the kernel survived"
    );
}
}

on_both_paths! {
async fn cancellation_kills_the_kernel() {
    let exec = executor();
    let token = CancellationToken::new();
    let opts = RunOptions {
        cancel: Some(token.clone()),
        ..Default::default()
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let opts = RunOptions {
        progress: Some(tx),
        ..opts
    };
    let nb = notebook(&["import time\ntime.sleep(300)"]);
    let run = tokio::spawn(async move { exec.run(nb, opts).await });
    let mut pid = None;
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
    }
    token.cancel();
    let o = tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .expect("ended")
        .expect("join");
    assert!(
        matches!(
            o.error,
            Some(RunError::Cancelled {
                cell_index: Some(0)
            })
        ),
        "{:?}",
        o.error
    );
    assert!(wait_group_gone(pid.expect("pid"), GONE).await.is_empty());
}
}

on_both_paths! {
async fn memory_limit_turns_a_huge_allocation_into_memory_error() {
    let mut c = config();
    c.memory_limit_bytes = Some(3 * 1024 * 1024 * 1024);
    let nb = notebook(&[
        "import resource\nprint(resource.getrlimit(resource.RLIMIT_AS)[0])",
        "x = bytearray(8 * 1024**3)",
    ]);
    let (o, _) = run_with(&Executor::new(c), nb, RunOptions::default()).await;
    assert_eq!(
        o.notebook.cells[0].outputs[0]["text"],
        format!("{}\n", 3u64 * 1024 * 1024 * 1024)
    );
    match &o.error {
        Some(RunError::Cell(e)) => assert_eq!(e.ename, "MemoryError"),
        other => panic!("expected MemoryError, got {other:?}"),
    }
}
}

#[tokio::test]
async fn startup_failures_return_the_notebook_unchanged() {
    let nb = notebook(&["1"]);
    let opts = RunOptions {
        kernel_name: Some("no-such-kernel-xyz".into()),
        ..Default::default()
    };
    let (o, pid) = run_with(&executor(), nb.clone(), opts).await;
    assert!(
        matches!(&o.error, Some(RunError::Startup(m)) if m.contains("no-such-kernel-xyz")),
        "{:?}",
        o.error
    );
    assert_eq!(o.notebook, nb);
    assert!(pid.is_none());

    let exec = Executor::new(om_worker::notebook::ExecutorConfig::local(
        "/nonexistent/bin/python3",
        om_worker::kernel::KernelTracker::new(),
    ));
    let (o, _) = run_with(&exec, nb.clone(), RunOptions::default()).await;
    assert!(o.error.is_some());
    assert_eq!(o.notebook, nb);
}
