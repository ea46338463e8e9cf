//! Measurements, not assertions (ignored by default):
//! `cargo test --release --test executor_bench -- --ignored --nocapture`
//! Prints medians of kernel start→ready, warm `1+1` round trip (execute_request → reply +
//! iopub idle) and a whole 3-cell run, over 20 runs each, plus the same for jupyter_client /
//! nbclient from the pinned venv for comparison.

#[path = "executor_common.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use om_worker::kernel::{KernelLauncher, KernelTracker, LaunchOptions, LocalLauncher};
use om_worker::notebook::RunOptions;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

const PY_BENCH: &str = r#"
import time, statistics, nbformat
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient
starts, rts = [], []
for _ in range(20):
    t = time.perf_counter()
    km, kc = start_new_kernel(kernel_name='python3', extra_arguments=['--HistoryManager.hist_file=:memory:'])
    starts.append(time.perf_counter() - t)
    for _ in range(20):
        t = time.perf_counter()
        kc.execute_interactive('1+1', output_hook=lambda m: None)
        rts.append(time.perf_counter() - t)
    kc.stop_channels(); km.shutdown_kernel(now=True)
runs = []
nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in ['x = 1', 'print(x)', 'x + 1']])
for _ in range(20):
    t = time.perf_counter()
    NotebookClient(nb, kernel_name='python3', shutdown_kernel='immediate').execute()
    runs.append(time.perf_counter() - t)
print(f'python start->ready median {statistics.median(starts)*1000:.1f} ms; 1+1 round trip median {statistics.median(rts)*1000:.2f} ms; nbclient 3-cell run median {statistics.median(runs)*1000:.1f} ms')
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure() {
    let launcher = LocalLauncher::new(venv_python(), KernelTracker::new());
    let opts = LaunchOptions {
        cwd: Some(std::env::temp_dir()),
        ..Default::default()
    };
    let mut starts = Vec::new();
    let mut rts = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let mut k = launcher.launch(&opts).await.expect("launch");
        starts.push(t.elapsed());
        for _ in 0..20 {
            let t = Instant::now();
            let id = k
                .client
                .send_shell("execute_request", serde_json::json!({"code": "1+1", "silent": false, "store_history": true, "user_expressions": {}, "allow_stdin": false, "stop_on_error": true}))
                .await
                .expect("send");
            let (mut reply, mut idle) = (false, false);
            while !(reply && idle) {
                match k.client.next_event().await {
                    Some(om_worker::kernel::ClientEvent::Message(_, m))
                        if m.parent_msg_id() == Some(id.as_str()) =>
                    {
                        reply |= m.msg_type() == "execute_reply";
                        idle |= m.msg_type() == "status" && m.content["execution_state"] == "idle";
                    }
                    Some(_) => {}
                    None => panic!("channels closed"),
                }
            }
            rts.push(t.elapsed());
        }
        k.shutdown(Duration::ZERO).await;
    }
    let exec = executor();
    let mut runs = Vec::new();
    for _ in 0..20 {
        let nb = notebook(&["x = 1", "print(x)", "x + 1"]);
        let t = Instant::now();
        let o = exec.run(nb, RunOptions::default()).await;
        assert!(o.is_ok());
        runs.push(t.elapsed());
    }
    println!(
        "om-worker start->ready median {:.1?}; 1+1 round trip median {:.2?}; executor 3-cell run median {:.1?} (graceful shutdown)",
        median(starts),
        median(rts),
        median(runs)
    );
    let py = std::process::Command::new(venv_python())
        .args(["-c", PY_BENCH])
        .output()
        .expect("python bench");
    println!(
        "{}{}",
        String::from_utf8_lossy(&py.stdout),
        String::from_utf8_lossy(&py.stderr)
    );
}
