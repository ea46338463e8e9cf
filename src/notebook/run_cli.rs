//! `om-worker run-notebook IN.ipynb OUT.ipynb`: run a local notebook with the worker's executor.
//!
//! Progress goes to stderr cell by cell; OUT is written in every case where a kernel ran (also
//! when a cell fails, times out or the kernel dies), and the exit status is 1 then, with an
//! error summary. SIGTERM/SIGINT kill the kernel's process group before exiting (status 143/130).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;

use super::executor::{Executor, ExecutorConfig, Progress, RunError, RunOptions};
use super::model::Notebook;
use crate::kernel::KernelTracker;

/// Arguments of `run-notebook` (mirrors `cli::RunNotebookFlags`).
#[derive(Debug, Clone, Default)]
pub struct RunNotebookArgs {
    /// Notebook to run.
    pub input: PathBuf,
    /// Where to write the executed notebook.
    pub output: PathBuf,
    /// Whole-run timeout in seconds.
    pub timeout: Option<f64>,
    /// Per-cell timeout in seconds.
    pub cell_timeout: Option<f64>,
    /// Python interpreter for the kernel (default `python3` on PATH).
    pub python: Option<String>,
    /// Kernel name (default: the notebook's kernelspec, else python3).
    pub kernel_name: Option<String>,
}

/// `eprintln!` that never panics: stderr may be a closed pipe (the parent went away), and a
/// progress line must not turn into a crash that skips writing OUT or killing the kernel.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn secs(s: Option<f64>) -> anyhow::Result<Option<Duration>> {
    match s {
        None => Ok(None),
        Some(v) => match crate::notebook::executor::timeout_from_secs(v) {
            Some(d) => Ok(Some(d)),
            None => anyhow::bail!("invalid timeout {v}: must be a positive number of seconds"),
        },
    }
}

fn preview(nb: &Notebook, index: usize) -> String {
    let line = nb
        .cells
        .get(index)
        .and_then(|c| c.source.lines().find(|l| !l.trim().is_empty()))
        .unwrap_or("")
        .trim();
    let mut p: String = line.chars().take(60).collect();
    if line.chars().count() > 60 {
        p.push('…');
    }
    p
}

/// Runs `run-notebook`. Exit status: 0 all cells ran, 1 the notebook failed (OUT written when a
/// kernel ran), 2 usage/IO errors are returned as `Err` for main to report.
pub async fn run_notebook_command(args: RunNotebookArgs) -> anyhow::Result<ExitCode> {
    let nb =
        Notebook::read(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let python = args.python.clone().unwrap_or_else(|| "python3".into());
    // Every kernel of this run, so the SIGTERM/SIGINT paths below can kill them (and say how
    // many) before the process exits.
    let kernels = KernelTracker::new();
    let config = ExecutorConfig::local(PathBuf::from(&python), kernels.clone());
    let executor = Executor::new(config);

    let (tx, mut rx) = mpsc::unbounded_channel();
    let opts = RunOptions {
        timeout: secs(args.timeout)?,
        cell_timeout: secs(args.cell_timeout)?,
        kernel_name: args.kernel_name.clone(),
        progress: Some(tx),
        ..Default::default()
    };

    let cell_previews: Vec<String> = (0..nb.cells.len()).map(|i| preview(&nb, i)).collect();
    let printer = tokio::spawn(async move {
        let mut err = std::io::stderr();
        while let Some(p) = rx.recv().await {
            let line = match p {
                Progress::KernelStarting { kernel_name } => {
                    format!("[run-notebook] starting kernel {kernel_name}")
                }
                Progress::KernelReady { startup, pid } => {
                    format!("[run-notebook] kernel ready in {startup:.2?} (pid {pid})")
                }
                Progress::CellStarted {
                    cell_index,
                    execution_count,
                    code_cells,
                } => format!(
                    "[run-notebook] cell {cell_index} [{execution_count}/{code_cells}] {}",
                    cell_previews
                        .get(cell_index)
                        .map(String::as_str)
                        .unwrap_or("")
                ),
                Progress::CellFinished {
                    cell_index,
                    duration,
                    error,
                } => match error {
                    None => format!("[run-notebook] cell {cell_index} ok ({duration:.2?})"),
                    Some(e) => {
                        format!("[run-notebook] cell {cell_index} FAILED: {e} ({duration:.2?})")
                    }
                },
                Progress::CellSkipped { cell_index } => {
                    format!("[run-notebook] cell {cell_index} skipped (skip-execution)")
                }
            };
            let _ = writeln!(err, "{line}");
        }
    });

    let run = executor.run(nb, opts);
    tokio::pin!(run);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    let outcome = tokio::select! {
        o = &mut run => o,
        _ = sigterm.recv() => {
            let n = kernels.kill_all();
            say!("[run-notebook] SIGTERM: killed {n} kernel process group(s)");
            return Ok(ExitCode::from(143));
        }
        _ = tokio::signal::ctrl_c() => {
            let n = kernels.kill_all();
            say!("[run-notebook] interrupted: killed {n} kernel process group(s)");
            return Ok(ExitCode::from(130));
        }
    };
    let _ = printer.await;

    let kernel_ran = outcome.timings.kernel_startup.is_some();
    if kernel_ran {
        outcome
            .notebook
            .write(&args.output)
            .with_context(|| format!("writing {}", args.output.display()))?;
    }
    let total = outcome.timings.total;
    match &outcome.error {
        None => {
            say!(
                "[run-notebook] done in {total:.2?}; wrote {}",
                args.output.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(e) => {
            let summary = match e {
                RunError::Cell(ce) => {
                    format!("cell {} raised {}: {}", ce.cell_index, ce.ename, ce.evalue)
                }
                other => match other.cell_index() {
                    Some(i) => format!("cell {i}: {other}"),
                    None => other.to_string(),
                },
            };
            say!("[run-notebook] FAILED: {summary}");
            if let RunError::Cell(ce) = e {
                for line in &ce.traceback {
                    say!("{line}");
                }
            }
            if kernel_ran {
                say!(
                    "[run-notebook] wrote partial result to {}",
                    args.output.display()
                );
            }
            Ok(ExitCode::from(1))
        }
    }
}
