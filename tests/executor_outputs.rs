//! Output handling against a real ipykernel (pinned venv; run scripts/setup-venv.sh).

#[path = "executor_common.rs"]
mod common;

use common::*;
use om_worker::notebook::{Cell, Executor, RunError, RunOptions, StreamMerge};
use serde_json::json;

on_both_paths! {
async fn streams_are_merged_per_name() {
    let nb = notebook(&[
        "import sys\nfor i in range(3):\n    print(i, flush=True)\n    sys.stdout.flush()\nsys.stderr.write('e1\\n'); sys.stderr.flush()\nprint('after')",
    ]);
    let (o, _) = run(nb).await;
    assert!(o.is_ok(), "{:?}", o.error);
    let outs = outputs(&o.notebook, 0);
    // consecutive same-name messages merged; stdout/stderr alternate
    for w in outs.windows(2) {
        assert!(
            !(w[0]["output_type"] == "stream"
                && w[1]["output_type"] == "stream"
                && w[0]["name"] == w[1]["name"]),
            "consecutive same-name streams not merged: {outs:?}"
        );
    }
    let all_stdout: String = outs
        .iter()
        .filter(|o| o["name"] == "stdout")
        .map(|o| o["text"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(all_stdout, "0\n1\n2\nafter\n");
    assert!(outs
        .iter()
        .any(|o| o["name"] == "stderr" && o["text"] == "e1\n"));
    nbformat_validate(&o.notebook);
}
}

on_both_paths! {
async fn coalesce_mode_matches_nbclient_coalesce_streams() {
    let mut c = config();
    c.stream_merge = StreamMerge::Coalesce;
    let nb = notebook(&[
        "print('a', flush=True)\nfrom IPython.display import display\ndisplay(1)\nprint('b\\rc')",
    ]);
    let (o, _) = run_with(&Executor::new(c), nb, RunOptions::default()).await;
    let outs = outputs(&o.notebook, 0);
    assert_eq!(outs.len(), 2, "{outs:?}");
    assert_eq!(outs[0]["text"], "a\nc\n");
}
}

on_both_paths! {
async fn rich_display_execute_result_and_unicode() {
    let png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";
    let nb = notebook(&[
        &format!(
            "from IPython.display import display, HTML, Image\nimport base64\ndisplay(HTML('<b>héllo ✓</b>'))\ndisplay(Image(data=base64.b64decode('{png}'), format='png'))"
        ),
        "print('ünïcødé 😀 中文')\n'résumé ✓'",
        "{'a': [1, 2]}",
    ]);
    let (o, _) = run(nb).await;
    assert!(o.is_ok(), "{:?}", o.error);
    let outs = outputs(&o.notebook, 0);
    assert_eq!(outs[0]["output_type"], "display_data");
    assert_eq!(outs[0]["data"]["text/html"], "<b>héllo ✓</b>");
    assert_eq!(
        outs[1]["data"]["image/png"].as_str().map(|s| s.trim()),
        Some(png)
    );
    assert!(outs[1]["data"]["text/plain"].is_string());
    let outs = outputs(&o.notebook, 1);
    assert_eq!(outs[0]["text"], "ünïcødé 😀 中文\n");
    assert_eq!(outs[1]["output_type"], "execute_result");
    assert_eq!(outs[1]["execution_count"], 2);
    assert_eq!(outs[1]["data"]["text/plain"], "'résumé ✓'");
    assert_eq!(o.notebook.cells[2].execution_count, Some(3));
    let text = o.notebook.to_ipynb_string();
    assert!(text.contains("😀"), "ensure_ascii=False");
    nbformat_validate(&o.notebook);
}
}

on_both_paths! {
async fn update_display_and_clear_output() {
    let nb = notebook(&[
        "from IPython.display import display\nh = display('v1', display_id='d1')",
        "h.update('v2')\nprint('x')",
        "from IPython.display import clear_output\nprint('gone')\nclear_output()\nprint('kept1')\nclear_output(wait=True)\nprint('kept2')",
    ]);
    let (o, _) = run(nb).await;
    assert!(o.is_ok(), "{:?}", o.error);
    assert_eq!(
        outputs(&o.notebook, 0)[0]["data"]["text/plain"],
        "'v2'",
        "update_display_data rewrites the earlier cell"
    );
    assert_eq!(outputs(&o.notebook, 1).len(), 1);
    let outs = outputs(&o.notebook, 2);
    assert_eq!(outs.len(), 1, "{outs:?}");
    assert_eq!(outs[0]["text"], "kept2\n");
}
}

on_both_paths! {
async fn error_stops_the_run_and_is_recorded() {
    let mut nb = notebook(&[
        "x = 1",
        "print('before')\nraise ValueError('boom ✗')",
        "x = 2",
    ]);
    nb.cells.insert(0, Cell::markdown("# title"));
    let (o, pid) = run(nb).await;
    let Some(RunError::Cell(e)) = &o.error else {
        panic!("expected a cell error, got {:?}", o.error)
    };
    assert_eq!(e.cell_index, 2);
    assert_eq!(e.ename, "ValueError");
    assert_eq!(e.evalue, "boom ✗");
    assert!(e.traceback.iter().any(|l| l.contains("ValueError")));
    assert!(e.message.starts_with("An error occurred while executing the following cell:\n------------------\nprint('before')"));
    assert!(e
        .message
        .contains("----- stdout -----\nbefore\n------------------"));
    let outs = outputs(&o.notebook, 2);
    assert_eq!(
        outs.last().map(|o| o["output_type"].clone()),
        Some(json!("error"))
    );
    assert_eq!(o.notebook.cells[2].execution_count, Some(2));
    assert_eq!(
        o.notebook.cells[3].execution_count, None,
        "later cells not run"
    );
    assert!(o.notebook.cells[3].outputs.is_empty());
    assert_eq!(o.notebook.cells[0].cell_type, "markdown");
    let exec = &o.notebook.cells[2].metadata["execution"];
    for k in [
        "iopub.status.busy",
        "iopub.execute_input",
        "shell.execute_reply",
        "iopub.status.idle",
    ] {
        assert!(
            exec[k]
                .as_str()
                .is_some_and(|s| s.ends_with('Z') && s.len() == 27),
            "{k}: {exec}"
        );
    }
    nbformat_validate(&o.notebook);
    let pid = pid.expect("kernel pid");
    assert!(
        wait_group_gone(pid, std::time::Duration::from_secs(10))
            .await
            .is_empty(),
        "orphan after error"
    );
}
}

on_both_paths! {
async fn tags_skip_execution_and_raises_exception() {
    let mut nb = notebook(&["raise RuntimeError('allowed')", "1/0", "print('end')"]);
    nb.cells[0]
        .metadata
        .insert("tags".into(), json!(["raises-exception"]));
    nb.cells[1]
        .metadata
        .insert("tags".into(), json!(["skip-execution"]));
    nb.cells[1]
        .outputs
        .push(json!({"output_type": "stream", "name": "stdout", "text": "old\n"}));
    let (o, _) = run(nb).await;
    assert!(o.is_ok(), "{:?}", o.error);
    assert_eq!(outputs(&o.notebook, 0)[0]["ename"], "RuntimeError");
    assert_eq!(
        outputs(&o.notebook, 1)[0]["text"],
        "old\n",
        "skipped cell untouched"
    );
    assert_eq!(o.notebook.cells[1].execution_count, None);
    assert_eq!(outputs(&o.notebook, 2)[0]["text"], "end\n");
    assert_eq!(o.notebook.cells[2].execution_count, Some(2));
}
}

on_both_paths! {
async fn kernel_env_and_cwd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config();
    c.cwd = Some(dir.path().to_path_buf());
    c.env =
        om_worker::kernel::KernelEnv::omega("mongodb://example:27017/omega", Some("amqp://b//"));
    let nb = notebook(&["import os\nprint(os.getcwd())\nprint(os.environ['OMEGA_MONGO_URL'], os.environ['OMEGA_BROKER'], os.environ['JPY_PARENT_PID'])"]);
    let (o, _) = run_with(&Executor::new(c), nb, RunOptions::default()).await;
    assert!(o.is_ok(), "{:?}", o.error);
    let text = outputs(&o.notebook, 0)[0]["text"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let real = std::fs::canonicalize(dir.path()).expect("canon");
    assert!(text.starts_with(&format!("{}\n", real.display())), "{text}");
    assert!(
        text.contains(&format!(
            "mongodb://example:27017/omega amqp://b// {}",
            std::process::id()
        )),
        "{text}"
    );
}
}

#[tokio::test]
async fn tcp_transport_fallback_works() {
    let mut c = config();
    c.transport = om_worker::kernel::Transport::Tcp;
    let (o, pid) = run_with(
        &Executor::new(c),
        notebook(&["print('tcp')", "1+1"]),
        RunOptions::default(),
    )
    .await;
    assert!(o.is_ok(), "{:?}", o.error);
    assert_eq!(outputs(&o.notebook, 0)[0]["text"], "tcp\n");
    assert_eq!(outputs(&o.notebook, 1)[0]["data"]["text/plain"], "2");
    assert!(
        wait_group_gone(pid.expect("pid"), std::time::Duration::from_secs(10))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn groundtruth_task_notebook_roundtrips_byte_identically() {
    // The notebook omega|ml stored (written by Python nbformat) must come out byte-identical.
    for name in [
        "task_notebook_as_stored.ipynb",
        "results_notebook_as_stored.ipynb",
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/groundtruth")
            .join(name);
        let text = std::fs::read_to_string(&path).expect("read");
        let nb = om_worker::notebook::Notebook::parse(&text).expect("parse");
        assert_eq!(nb.to_ipynb_string(), text, "{name}");
    }
}
