//! Fidelity: our executor's result equals nbclient's (run via the pinned venv) for the sample
//! notebooks in tests/fixtures/notebooks/, ignoring cell ids, `metadata.execution` timings and
//! documented kernel noise:
//! - stream fragmentation: nbclient (coalesce_streams=False) keeps one output per iopub message,
//!   which depends on ipykernel's flush timing, so both sides are compared with consecutive
//!   same-name streams merged;
//! - the per-process temp path in warnings/tracebacks (`/tmp/ipykernel_<pid>/<hash>.py`).

#[path = "executor_common.rs"]
mod common;

use std::path::Path;

use common::*;
use om_worker::notebook::{Executor, Notebook, RunError, RunOptions, StreamMerge};
use serde_json::Value;

const NBCLIENT: &str = r#"
import sys, nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
nb = nbformat.read(sys.argv[1], as_version=4)
client = NotebookClient(nb, timeout=60, kernel_name='', shutdown_kernel='immediate',
                        resources={'metadata': {'path': sys.argv[3]}})
err = ''
try:
    client.execute()
except CellExecutionError as e:
    err = e.ename
nbformat.write(nb, sys.argv[2])
print(err)
"#;

fn normalize_text(s: &str) -> String {
    // /tmp/ipykernel_12345/3717711231.py -> /tmp/ipykernel_N/N.py
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("ipykernel_") {
        out.push_str(&rest[..i + "ipykernel_".len()]);
        rest = &rest[i + "ipykernel_".len()..];
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if digits > 0 {
            out.push('N');
            rest = &rest[digits..];
            if let Some(r) = rest.strip_prefix('/') {
                let d2 = r.chars().take_while(char::is_ascii_digit).count();
                out.push('/');
                out.push('N');
                rest = &r[d2..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn normalize(v: &mut Value) {
    match v {
        Value::String(s) => *s = normalize_text(s),
        Value::Array(a) => a.iter_mut().for_each(normalize),
        Value::Object(m) => m.values_mut().for_each(normalize),
        _ => {}
    }
}

fn canonical(path: &Path) -> Value {
    let nb = Notebook::read(path).expect("read result");
    let mut v = nb.to_value();
    if let Some(Value::Array(cells)) = v.get_mut("cells") {
        for cell in cells {
            let Value::Object(c) = cell else { continue };
            c.remove("id");
            if let Some(Value::Object(md)) = c.get_mut("metadata") {
                md.remove("execution");
            }
            if let Some(Value::Array(outs)) = c.get_mut("outputs") {
                let mut merged: Vec<Value> = Vec::new();
                for o in outs.drain(..) {
                    if let (Some(last), true) = (merged.last_mut(), o["output_type"] == "stream") {
                        if last["output_type"] == "stream" && last["name"] == o["name"] {
                            let t = format!(
                                "{}{}",
                                last["text"].as_str().unwrap_or(""),
                                o["text"].as_str().unwrap_or("")
                            );
                            last["text"] = Value::String(t);
                            continue;
                        }
                    }
                    merged.push(o);
                }
                *outs = merged;
            }
        }
    }
    normalize(&mut v);
    v
}

async fn compare(name: &str, expect_error: Option<&str>) {
    let input = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/notebooks")
        .join(name);
    let dir = tempfile::tempdir().expect("tempdir");
    let theirs = dir.path().join("nbclient.ipynb");
    let ours = dir.path().join("ours.ipynb");
    let cwd = dir.path().join("cwd");
    std::fs::create_dir(&cwd).expect("cwd");

    let py = std::process::Command::new(venv_python())
        .args(["-c", NBCLIENT])
        .arg(&input)
        .arg(&theirs)
        .arg(&cwd)
        .output()
        .expect("run nbclient");
    assert!(
        py.status.success(),
        "nbclient failed: {}",
        String::from_utf8_lossy(&py.stderr)
    );
    let their_err = String::from_utf8_lossy(&py.stdout).trim().to_string();

    let mut c = config();
    c.cwd = Some(cwd.clone());
    c.stream_merge = StreamMerge::None;
    let nb = Notebook::read(&input).expect("read input");
    let (o, _) = run_with(&Executor::new(c), nb, RunOptions::default()).await;
    o.notebook.write(&ours).expect("write ours");
    let our_err = match &o.error {
        None => String::new(),
        Some(RunError::Cell(e)) => e.ename.clone(),
        Some(other) => panic!("unexpected run error {other:?}"),
    };
    assert_eq!(our_err, their_err, "error outcome differs");
    assert_eq!(our_err, expect_error.unwrap_or(""));
    nbformat_validate(&o.notebook);

    let (a, b) = (canonical(&ours), canonical(&theirs));
    let n_outputs: usize = a["cells"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| c["outputs"].as_array().map_or(0, Vec::len))
                .sum()
        })
        .unwrap_or(0);
    assert!(
        n_outputs >= 3,
        "{name}: suspiciously few outputs ({n_outputs})"
    );
    if a != b {
        let pa = serde_json::to_string_pretty(&a).unwrap_or_default();
        let pb = serde_json::to_string_pretty(&b).unwrap_or_default();
        for (i, (la, lb)) in pa.lines().zip(pb.lines()).enumerate() {
            if la != lb {
                panic!("{name}: first difference at line {i}:\n ours:    {la}\n nbclient: {lb}\n\nours:\n{pa}");
            }
        }
        panic!("{name}: results differ in length\nours:\n{pa}\nnbclient:\n{pb}");
    }
}

on_both_paths! {
async fn basic_matches_nbclient() {
    compare("basic.ipynb", None).await;
}
}

on_both_paths! {
async fn errors_match_nbclient() {
    compare("errors.ipynb", Some("ValueError")).await;
}
}

on_both_paths! {
async fn display_matches_nbclient() {
    compare("display.ipynb", None).await;
}
}

on_both_paths! {
/// What a kernel app sets up: matplotlib's inline backend (PNG figures, the post-execute hook),
/// `display_id` updates, `clear_output`, `!shell`, cell magics, `%env`, `%who`, `get_ipython()`,
/// `input()` → StdinNotImplementedError, IPython's ANSI tracebacks, top-level `await`, `x?`.
async fn kernel_machinery_matches_nbclient() {
    compare("kernel.ipynb", None).await;
}
}
