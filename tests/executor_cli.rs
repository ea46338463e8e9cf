//! `om-worker run-notebook` as a child process: exit status, OUT written on failure, and no
//! kernel left behind after SIGTERM or even SIGKILL of the command.

#[path = "executor_common.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use om_worker::notebook::Notebook;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/notebooks")
        .join(name)
}

fn cmd(input: &std::path::Path, output: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_om-worker"));
    c.arg("run-notebook")
        .arg(input)
        .arg(output)
        .arg("--python")
        .arg(venv_python());
    c
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let end = Instant::now() + within;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("run-notebook did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn success_and_failure_exit_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("ok.ipynb");
    let mut child = cmd(&fixture("basic.ipynb"), &out)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    assert!(wait_exit(&mut child, Duration::from_secs(120)).success());
    nbformat_validate(&Notebook::read(&out).expect("read OUT"));

    let out = dir.path().join("err.ipynb");
    let res = cmd(&fixture("errors.ipynb"), &out).output().expect("run");
    assert_eq!(res.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        stderr.contains("FAILED: cell 4 raised ValueError: boom ✗"),
        "{stderr}"
    );
    let nb = Notebook::read(&out).expect("OUT written on failure");
    assert_eq!(
        nb.cells[4].outputs.last().map(|o| o["ename"].clone()),
        Some("ValueError".into())
    );
}

/// Starts a run of an endless cell, returns (child, kernel pid, connection file).
fn start_endless(dir: &std::path::Path) -> (Child, i32, String) {
    let input = dir.join("sleep.ipynb");
    notebook(&["import time\nwhile True:\n    time.sleep(0.2)"])
        .write(&input)
        .expect("write");
    let mut child = cmd(&input, &dir.join("out.ipynb"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let mut pid = None;
    for line in lines.by_ref() {
        let line = line.expect("line");
        if let Some(p) = line.split("(pid ").nth(1) {
            pid = p.trim_end_matches(')').parse::<i32>().ok();
        }
        if line.contains("cell 0 [1/1]") {
            break;
        }
    }
    // keep draining stderr like a terminal would
    std::thread::spawn(move || for _ in lines {});
    let pid = pid.expect("kernel pid in progress output");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("kernel cmdline");
    let conn = String::from_utf8_lossy(&cmdline)
        .split('\0')
        .find(|a| a.ends_with("kernel.json"))
        .expect("connection file in kernel argv")
        .to_string();
    (child, pid, conn)
}

#[tokio::test]
async fn sigterm_mid_run_leaves_no_kernel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, pid, conn) = start_endless(dir.path());
    assert!(!group_members(pid).is_empty());
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(143));
    assert!(
        wait_group_gone(pid, Duration::from_secs(10))
            .await
            .is_empty(),
        "kernel group survived SIGTERM"
    );
    assert!(
        procs_with_cmdline(&conn).is_empty(),
        "a process still references {conn}"
    );
}

#[tokio::test]
async fn sigkill_of_the_command_still_ends_the_kernel() {
    // No handler runs on SIGKILL: ipykernel's parent poller (JPY_PARENT_PID) ends the kernel.
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, pid, conn) = start_endless(dir.path());
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    assert!(
        wait_group_gone(pid, Duration::from_secs(15))
            .await
            .is_empty(),
        "kernel outlived a SIGKILLed worker"
    );
    assert!(procs_with_cmdline(&conn).is_empty());
    // the runtime dir is left behind (nobody alive to remove it); the worker's start-up sweep
    // removes such dirs
    let rundir = std::path::Path::new(&conn)
        .parent()
        .expect("runtime dir")
        .to_path_buf();
    assert!(rundir.exists());
    om_worker::kernel::sweep_stale_runtime_dirs(Duration::from_secs(1));
    assert!(!rundir.exists(), "sweep left {}", rundir.display());
}
