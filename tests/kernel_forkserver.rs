//! Fork server (`ForkServerLauncher` + `python/om_forkserver.py`) against the real ipykernel in
//! the pinned venv: same results as a plain kernel, death reporting, no orphans, server crash
//! recovery and fallback. Most tests preload only `json` (fast server start); one preloads the
//! omegaml default list.

#[path = "executor_common.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use om_worker::kernel::{
    ForkServerConfig, ForkServerLauncher, KernelEnv, KernelLauncher, KernelMode, KernelTracker,
    LaunchOptions,
};
use om_worker::notebook::{Executor, ExecutorConfig, RunError, RunOptions};

const GONE: Duration = Duration::from_secs(15);

/// A fork server for the test's kernel path ([`on_both_paths!`]; a plain `#[tokio::test]` gets
/// forked ipykernel apps).
fn fs_config() -> ForkServerConfig {
    let mut c = ForkServerConfig::new(venv_python());
    c.kernel_mode = match kernel_path() {
        KernelPath::Shell => KernelMode::Shell,
        KernelPath::Ipykernel => KernelMode::Ipykernel,
    };
    c.default_preload = false;
    c.preload = vec!["json".into()];
    c.cwd = Some(std::env::temp_dir());
    c
}

fn launch_opts() -> LaunchOptions {
    LaunchOptions {
        cwd: Some(std::env::temp_dir()),
        ..LaunchOptions::default()
    }
}

fn fork_executor(launcher: Arc<ForkServerLauncher>) -> Executor {
    let mut c = ExecutorConfig::new(launcher);
    c.cwd = Some(std::env::temp_dir());
    Executor::new(c)
}

/// Parent pid of `pid` from /proc.
fn ppid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Outputs without volatile parts (execution timing metadata).
fn all_outputs(nb: &om_worker::notebook::Notebook) -> Vec<Vec<serde_json::Value>> {
    nb.cells.iter().map(|c| c.outputs.clone()).collect()
}

on_both_paths! {
async fn forked_kernel_gives_the_same_results_as_a_local_one() {
    let cells = [
        "import sys, os\nprint(sys.path[:4])\nprint(sys.argv[0].rsplit('/', 1)[-1], sys.executable)",
        "print(os.getcwd() == os.path.realpath(%r))",
        "print(os.getpid() == os.getpgid(0), 'JPY_PARENT_PID' in os.environ)",
        "from IPython.display import display, HTML\ndisplay(HTML('<b>x</b>'))\n1 + 1",
        "import sys\nprint('err', file=sys.stderr)\nprint(__name__, type(get_ipython()).__name__)",
        "raise ValueError('boom')",
    ];
    let tmp = std::env::temp_dir()
        .canonicalize()
        .expect("tmp")
        .display()
        .to_string();
    let cells: Vec<String> = cells
        .iter()
        .map(|c| c.replace("%r", &format!("{tmp:?}")))
        .collect();
    let refs: Vec<&str> = cells.iter().map(String::as_str).collect();

    let launcher = Arc::new(ForkServerLauncher::new(fs_config(), KernelTracker::new()));
    let (forked, fpid) = run_with(
        &fork_executor(Arc::clone(&launcher)),
        notebook(&refs),
        RunOptions::default(),
    )
    .await;
    let (local, _) = run(notebook(&refs)).await;
    assert_eq!(launcher.stats().forked, 1, "{:?}", launcher.stats());
    assert_eq!(launcher.stats().local, 0);
    assert!(fpid.is_some());
    for o in [&forked, &local] {
        assert!(
            matches!(&o.error, Some(RunError::Cell(e)) if e.ename == "ValueError"),
            "{:?}",
            o.error
        );
    }
    assert_eq!(all_outputs(&forked.notebook), all_outputs(&local.notebook));
    assert_eq!(
        forked.notebook.metadata.get("language_info"),
        local.notebook.metadata.get("language_info")
    );
    launcher.shutdown().await;
}
}

on_both_paths! {
async fn forked_kernel_is_a_child_of_the_server_in_its_own_session() {
    let launcher = ForkServerLauncher::new(fs_config(), KernelTracker::new());
    let kernel = tokio::time::timeout(Duration::from_secs(120), launcher.launch(&launch_opts()))
        .await
        .expect("bounded")
        .expect("launch");
    let server = launcher.server_pid().await.expect("server running");
    let pid = kernel.pid();
    assert_eq!(ppid(pid), Some(server));
    assert!(!group_members(pid).is_empty());
    assert!(launcher.kernels().live_groups().contains(&pid));
    let exit = kernel.shutdown(Duration::from_secs(5)).await;
    assert!(exit.is_some(), "exit status reported by the server");
    assert!(wait_group_gone(pid, GONE).await.is_empty());
    assert!(!launcher.kernels().live_groups().contains(&pid));
    launcher.shutdown().await;
}
}

on_both_paths! {
async fn forked_kernel_death_is_reported_quickly() {
    let launcher = Arc::new(ForkServerLauncher::new(fs_config(), KernelTracker::new()));
    let exec = fork_executor(Arc::clone(&launcher));
    // Start the server first so the timing below covers only the death.
    launcher.start().await.expect("server starts");
    let started = Instant::now();
    let (o, pid) = run_with(
        &exec,
        notebook(&["import os\nos._exit(3)", "print('never')"]),
        RunOptions::default(),
    )
    .await;
    let took = started.elapsed();
    match &o.error {
        Some(RunError::KernelDied { cell_index, exit }) => {
            assert_eq!(*cell_index, Some(0));
            assert!(exit.contains("exit status 3"), "{exit}");
        }
        other => panic!("expected KernelDied, got {other:?}"),
    }
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(wait_group_gone(pid.expect("pid"), GONE).await.is_empty());
    launcher.shutdown().await;
}
}

on_both_paths! {
async fn no_orphans_after_success_error_and_timeout() {
    let launcher = Arc::new(ForkServerLauncher::new(fs_config(), KernelTracker::new()));
    let exec = fork_executor(Arc::clone(&launcher));
    // Each run leaves a grandchild in the kernel's process group.
    let spawn = "import subprocess\np = subprocess.Popen(['sleep', '300'])";
    let cases: Vec<(Vec<&str>, RunOptions)> = vec![
        (vec![spawn, "print('ok')"], RunOptions::default()),
        (vec![spawn, "1/0"], RunOptions::default()),
        (
            vec![spawn, "import time\ntime.sleep(300)"],
            RunOptions {
                cell_timeout: Some(Duration::from_secs(2)),
                ..Default::default()
            },
        ),
    ];
    for (i, (cells, opts)) in cases.into_iter().enumerate() {
        let (o, pid) = run_with(&exec, notebook(&cells), opts).await;
        let pid = pid.expect("kernel started");
        match i {
            0 => assert!(o.error.is_none(), "{:?}", o.error),
            1 => assert!(matches!(o.error, Some(RunError::Cell(_))), "{:?}", o.error),
            _ => assert!(
                matches!(o.error, Some(RunError::CellTimeout { .. })),
                "{:?}",
                o.error
            ),
        }
        let left = wait_group_gone(pid, GONE).await;
        assert!(left.is_empty(), "case {i}: survivors {left:?}");
    }
    assert_eq!(launcher.stats().forked, 3);
    launcher.shutdown().await;
}
}

on_both_paths! {
/// Processes a task moved out of its process group and session (`start_new_session`, a double
/// fork whose middle process exits) end with the task too: while the kernel lives they are
/// below it (it is their subreaper) and the tree is killed; when the kernel itself died first
/// (`os._exit`), the fork server adopts and kills them.
async fn escaped_processes_end_with_the_task() {
    let launcher = Arc::new(ForkServerLauncher::new(fs_config(), KernelTracker::new()));
    let exec = fork_executor(Arc::clone(&launcher));
    let tag = format!("omw-escape-{}", std::process::id());
    let escape = format!(
        "import os, subprocess\n\
         subprocess.Popen(['sleep', '600', '{tag}-a'], start_new_session=True)\n\
         if os.fork() == 0:\n    os.setsid()\n    \
         subprocess.Popen(['sleep', '600', '{tag}-b'], start_new_session=True)\n    os._exit(0)\n\
         import time\ntime.sleep(0.5)"
    );
    let cases = [
        (vec![escape.as_str(), "print('ok')"], "normal end"),
        (
            vec![escape.as_str(), "import os\nos._exit(3)"],
            "kernel died",
        ),
    ];
    for (cells, what) in cases {
        let (o, pid) = run_with(&exec, notebook(&cells), RunOptions::default()).await;
        assert!(pid.is_some(), "{what}: kernel started");
        if what == "normal end" {
            assert!(o.error.is_none(), "{what}: {:?}", o.error);
        } else {
            assert!(o.error.is_some(), "{what}: the kernel's death is an error");
        }
        let end = Instant::now() + GONE;
        let mut left = procs_with_cmdline(&tag);
        while !left.is_empty() && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(100)).await;
            left = procs_with_cmdline(&tag);
        }
        assert!(
            left.is_empty(),
            "{what}: escaped processes survived: {left:?}"
        );
    }
    launcher.shutdown().await;
}
}

on_both_paths! {
async fn server_sigkill_spares_its_kernels_then_restart_then_fallback() {
    let mut cfg = fs_config();
    cfg.max_restarts = 1;
    let launcher = ForkServerLauncher::new(cfg, KernelTracker::new());
    let opts = launch_opts();
    let bound = Duration::from_secs(120);

    let k1 = tokio::time::timeout(bound, launcher.launch(&opts))
        .await
        .expect("bounded")
        .expect("launch 1");
    let s1 = launcher.server_pid().await.expect("server 1");
    kill(Pid::from_raw(s1), Signal::SIGKILL).expect("kill server");
    // The kernel runs on without its server (a task that kills the server harms no other
    // slot); its end is still seen.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(k1.process.is_alive(), "the kernel died with its server");
    assert!(k1.process.exit_status().is_none());
    k1.process.kill().await;
    let exit = tokio::time::timeout(GONE, k1.process.exited())
        .await
        .expect("the end of a kernel that outlived its server is reported");
    assert!(
        matches!(exit, om_worker::kernel::KernelExit::Unknown(_)),
        "{exit:?}"
    );
    assert!(wait_group_gone(k1.pid(), GONE).await.is_empty());
    drop(k1);

    // Restarted (1 restart allowed).
    let k2 = tokio::time::timeout(bound, launcher.launch(&opts))
        .await
        .expect("bounded")
        .expect("launch 2");
    let s2 = launcher.server_pid().await.expect("server 2");
    assert_ne!(s1, s2);
    assert_eq!(ppid(k2.pid()), Some(s2));
    assert_eq!(launcher.stats().server_starts, 2);
    kill(Pid::from_raw(s2), Signal::SIGKILL).expect("kill server 2");
    let pid2 = k2.pid();
    k2.shutdown(Duration::ZERO).await;
    assert!(wait_group_gone(pid2, GONE).await.is_empty());

    // Budget spent: local kernels from now on.
    let k3 = tokio::time::timeout(bound, launcher.launch(&opts))
        .await
        .expect("bounded")
        .expect("launch 3 (local fallback)");
    assert_eq!(ppid(k3.pid()), Some(std::process::id() as i32));
    let stats = launcher.stats();
    assert_eq!((stats.forked, stats.local, stats.server_starts), (2, 1, 2));
    assert!(launcher.disabled_reason().await.is_some());
    let pid3 = k3.pid();
    k3.shutdown(Duration::from_secs(2)).await;
    assert!(wait_group_gone(pid3, GONE).await.is_empty());
}
}

#[tokio::test]
async fn server_that_cannot_start_falls_back_to_local_once() {
    // A preload that kills the interpreter while importing: the server never gets ready.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("om_crashy_mod.py"),
        "import os\nos._exit(7)\n",
    )
    .expect("w");
    let env = KernelEnv::inherit().with("PYTHONPATH", dir.path().display().to_string());
    let mut cfg = fs_config();
    cfg.preload = vec!["om_crashy_mod".into()];
    cfg.env = env.clone();
    let launcher = ForkServerLauncher::new(cfg, KernelTracker::new());
    let opts = LaunchOptions {
        env,
        ..launch_opts()
    };
    for _ in 0..2 {
        let k = tokio::time::timeout(Duration::from_secs(120), launcher.launch(&opts))
            .await
            .expect("bounded")
            .expect("local fallback launch");
        assert_eq!(ppid(k.pid()), Some(std::process::id() as i32));
        k.shutdown(Duration::from_secs(2)).await;
    }
    let stats = launcher.stats();
    assert_eq!((stats.forked, stats.local, stats.server_starts), (0, 2, 1));
    let why = launcher.disabled_reason().await.expect("disabled");
    assert!(why.contains("unavailable"), "{why}");
}

#[tokio::test]
async fn failing_preload_is_reported_not_fatal() {
    let mut cfg = fs_config();
    cfg.preload = vec!["json".into(), "om_no_such_module_xyz".into()];
    let launcher = ForkServerLauncher::new(cfg, KernelTracker::new());
    let k = tokio::time::timeout(Duration::from_secs(120), launcher.launch(&launch_opts()))
        .await
        .expect("bounded")
        .expect("launch");
    assert_eq!(launcher.stats().forked, 1);
    k.shutdown(Duration::from_secs(2)).await;
    launcher.shutdown().await;
}

#[tokio::test]
async fn requests_the_server_cannot_serve_faithfully_go_local() {
    let launcher = ForkServerLauncher::new(fs_config(), KernelTracker::new());
    // Another cwd than the server's: omegaml reads config.yml from the cwd at import time.
    let other = tempfile::tempdir().expect("tempdir");
    let opts = LaunchOptions {
        cwd: Some(other.path().to_path_buf()),
        ..LaunchOptions::default()
    };
    let k = tokio::time::timeout(Duration::from_secs(120), launcher.launch(&opts))
        .await
        .expect("bounded")
        .expect("launch");
    assert_eq!(ppid(k.pid()), Some(std::process::id() as i32));
    k.shutdown(Duration::from_secs(2)).await;
    // Another env: same.
    let opts = LaunchOptions {
        env: KernelEnv::inherit().with("OM_TEST_OTHER", "1"),
        ..launch_opts()
    };
    let k = tokio::time::timeout(Duration::from_secs(120), launcher.launch(&opts))
        .await
        .expect("bounded")
        .expect("launch");
    k.shutdown(Duration::from_secs(2)).await;
    let stats = launcher.stats();
    assert_eq!((stats.forked, stats.local, stats.server_starts), (0, 2, 0));
}

on_both_paths! {
/// The server script on its own, started by an owner process (om-worker's part): EOF on
/// stdin (om-worker dropped the server) ends the server and its kernels; a SIGKILLed server's
/// kernel runs on (a task that kills the server harms no other slot); when the owner and the
/// server are both SIGKILLed, the kernel ends by itself (it watches the owner).
async fn server_exit_and_owner_exit() {
    use std::io::{BufRead, BufReader, Write};
    for how in ["eof", "server-sigkill", "owner-gone"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("om_forkserver.py");
        std::fs::write(&script, om_worker::kernel::forkserver::FORKSERVER_SCRIPT).expect("w");
        // The owner: a process of its own that starts the server and waits for it.
        let mut owner = std::process::Command::new(venv_python())
            .arg("-c")
            // lives on after the server (as om-worker does) until killed
            .arg("import subprocess, sys, time; subprocess.call(sys.argv[1:]); time.sleep(600)")
            .arg(venv_python())
            .arg(&script)
            .arg("--no-default-preload")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn owner");
        let mut out = BufReader::new(owner.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("ready line");
        assert!(line.contains("\"ready\""), "{line}");
        let ready: serde_json::Value = serde_json::from_str(&line).expect("ready json");
        let server_pid = ready["pid"].as_i64().expect("server pid") as i32;
        let cf = dir.path().join("k.json");
        let key = "0123456789abcdef";
        std::fs::write(
            &cf,
            serde_json::json!({"transport": "ipc", "ip": dir.path().join("k").display().to_string(),
                "shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5,
                "key": key, "signature_scheme": "hmac-sha256", "kernel_name": "python3"})
            .to_string(),
        )
        .expect("cf");
        let mut stdin = owner.stdin.take().expect("stdin");
        let req = serde_json::json!({"op": "fork", "id": 1,
            "argv": ["-f", cf.display().to_string(), "--HistoryManager.hist_file=:memory:"],
            "env": std::env::vars().collect::<std::collections::BTreeMap<_, _>>(), "cwd": null});
        writeln!(stdin, "{req}").expect("send");
        line.clear();
        out.read_line(&mut line).expect("forked line");
        let reply: serde_json::Value = serde_json::from_str(&line).expect("json");
        let pid = reply["pid"].as_i64().expect("pid") as i32;
        // Wait until the kernel is up (its shell socket exists).
        let end = Instant::now() + Duration::from_secs(60);
        while !dir.path().join("k-1").exists() && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!group_members(pid).is_empty(), "{how}: kernel running");
        match how {
            "eof" => drop(stdin),
            "server-sigkill" => {
                kill(Pid::from_raw(server_pid), Signal::SIGKILL).expect("kill server");
                tokio::time::sleep(Duration::from_secs(3)).await;
                assert!(
                    !group_members(pid).is_empty(),
                    "{how}: the kernel died with its server"
                );
                assert_ne!(ppid(pid), Some(server_pid));
                om_worker::kernel::process::kill_tree(pid);
                drop(stdin);
            }
            _ => {
                owner.kill().expect("kill owner");
                kill(Pid::from_raw(server_pid), Signal::SIGKILL).expect("kill server");
                drop(stdin);
            }
        }
        let left = wait_group_gone(pid, GONE).await;
        assert!(left.is_empty(), "{how}: kernel still running: {left:?}");
        let _ = owner.kill();
        let _ = owner.wait();
    }
}
}

/// omega|ml task children (`fork_task_warm`): after the first task, each task runs in a spare
/// child forked and warmed up ahead of it, and a new spare is forked right after; every task
/// still gets a process of its own that ends with it.
#[tokio::test]
async fn task_children_after_the_first_run_in_spares() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = ForkServerConfig::new(venv_python()); // default preload: omegaml, its task app
    cfg.cwd = Some(dir.path().to_path_buf());
    cfg.env = KernelEnv::inherit()
        .with(
            "OMEGA_CONFIG_FILE",
            dir.path().join("none.yml").display().to_string(),
        )
        .with("OMEGA_MONGO_URL", "mongodb://127.0.0.1:9/omw_none");
    let launcher = ForkServerLauncher::new(cfg, KernelTracker::new());
    let mut pids = Vec::new();
    for i in 0..3 {
        let rdir = dir.path().join(format!("r{i}"));
        std::fs::create_dir(&rdir).expect("mkdir");
        let req = rdir.join("request.json");
        let body = serde_json::json!({
            // Celery's builtin `accumulate` returns its args: no database needed here
            "task": "celery.accumulate", "id": format!("t{i}"), "args": [i, "x"],
            "kwargs": {"$dict": []}, "request": {"hostname": "omw-spare@test"},
            "result_serializer": "json", "result_dir": rdir.display().to_string()});
        std::fs::write(&req, body.to_string()).expect("request");
        let child = tokio::time::timeout(
            Duration::from_secs(180),
            launcher.fork_task_warm(&req, &Default::default(), None, "omw-spare@test"),
        )
        .await
        .expect("bounded")
        .expect("task child");
        let exit = tokio::time::timeout(Duration::from_secs(120), child.exited())
            .await
            .expect("task ends");
        let outcome: serde_json::Value =
            serde_json::from_slice(&std::fs::read(rdir.join("outcome.json")).expect("outcome"))
                .expect("json");
        assert_eq!(
            outcome["status"], "SUCCESS",
            "task {i}: {outcome} ({exit:?})"
        );
        let result: serde_json::Value =
            serde_json::from_slice(&std::fs::read(rdir.join("result.bin")).expect("result"))
                .expect("json result");
        assert_eq!(result, serde_json::json!([i, "x"]));
        pids.push(child.pid());
        child.kill().await;
    }
    pids.dedup();
    assert_eq!(pids.len(), 3, "one process per task: {pids:?}");
    assert_eq!(launcher.stats().spares_used, 2);
    launcher.shutdown().await;
}

on_both_paths! {
/// One run's state never reaches the next: each run is a fresh child of the same pristine
/// server (variables, module attributes, `sys.modules`, `os.environ`, cwd, the IPython history
/// and execution count, matplotlib figures, builtins).
async fn state_of_one_run_is_absent_in_the_next() {
    let launcher = Arc::new(ForkServerLauncher::new(fs_config(), KernelTracker::new()));
    let exec = fork_executor(Arc::clone(&launcher));
    let first = notebook(&[
        "import json, os, sys, builtins\nleak = 1\njson.LEAK = 1\nsys.modules['om_leak'] = json\n\
         os.environ['OM_LEAK'] = '1'\nbuiltins.om_leak = 1\nos.chdir('/')\n\
         get_ipython().user_ns['ns_leak'] = 1\nprint(os.getpid())",
        "In[-1], get_ipython().execution_count",
    ]);
    let check = notebook(&[
        "import json, os, sys, builtins\nprint(sorted(k for k in ('leak', 'ns_leak') if k in globals()), \
         hasattr(json, 'LEAK'), 'om_leak' in sys.modules, 'OM_LEAK' in os.environ, \
         hasattr(builtins, 'om_leak'), os.getcwd() != '/', get_ipython().execution_count, \
         len(get_ipython().history_manager.input_hist_parsed), os.getpid())\n\
         print(repr(_), Out, len(In))",
    ]);
    let (a, apid) = run_with(&exec, first, RunOptions::default()).await;
    assert!(a.is_ok(), "{:?}", a.error);
    let (b, bpid) = run_with(&exec, check, RunOptions::default()).await;
    assert!(b.is_ok(), "{:?}", b.error);
    assert_ne!(apid, bpid, "a fresh process per run");
    let text = b.notebook.cells[0].outputs[0]["text"]
        .as_str()
        .expect("stream output")
        .to_string();
    let pid = bpid.expect("kernel pid");
    assert_eq!(
        text,
        // the count is 2 while the first cell runs (as in any kernel)
        format!("[] False False False False True 2 2 {pid}\n'' {{}} 2\n"),
        "state leaked from the first run"
    );
    assert_eq!(launcher.stats().local, 0, "both runs were forked");
}
}

/// The shell path captures what is written to file descriptors 1 and 2 (a subprocess, a C
/// library) and drains it before the cell's reply: it lands in the cell that wrote it, every
/// time (a kernel app's fd watcher may deliver it after the reply, into the next cell or nowhere).
#[tokio::test]
async fn shell_fd_output_lands_in_its_own_cell() {
    let mut cfg = fs_config();
    cfg.kernel_mode = KernelMode::Shell;
    let launcher = Arc::new(ForkServerLauncher::new(cfg, KernelTracker::new()));
    let exec = fork_executor(Arc::clone(&launcher));
    let nb = notebook(&[
        "import os, subprocess\nos.system('echo fd-one')\nos.write(2, b'fd-two\\n')\n\
         subprocess.run(['sh', '-c', 'echo sub-out; echo sub-err >&2'])\nNone",
        "print('next')",
    ]);
    for _ in 0..3 {
        let (o, _) = run_with(&exec, nb.clone(), RunOptions::default()).await;
        assert!(o.is_ok(), "{:?}", o.error);
        let text = |cell: usize, name: &str| -> String {
            o.notebook.cells[cell]
                .outputs
                .iter()
                .filter(|x| x["name"] == name)
                .filter_map(|x| x["text"].as_str())
                .collect()
        };
        assert_eq!(text(0, "stdout"), "fd-one\nsub-out\n");
        assert_eq!(text(0, "stderr"), "fd-two\nsub-err\n");
        assert_eq!(text(1, "stdout"), "next\n");
        assert_eq!(text(1, "stderr"), "");
    }
    assert_eq!(launcher.stats().local, 0);
}
