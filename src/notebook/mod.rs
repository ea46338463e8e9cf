//! Notebooks: the nbformat v4 model ([`model`]), Python-compatible JSON ([`json`]), the
//! executor that runs them in Jupyter kernels ([`executor`]) and the `run-notebook` command
//! ([`run_cli`]).
//!
//! How the worker uses it:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use om_worker::kernel::{KernelEnv, KernelTracker};
//! use om_worker::notebook::{Executor, ExecutorConfig, Notebook, RunOptions};
//!
//! // Every kernel the executor starts is registered here, for the shutdown path.
//! let kernels = KernelTracker::new();
//! let mut config = ExecutorConfig::local("/opt/venv/bin/python", kernels.clone());
//! config.env = KernelEnv::omega("mongodb://db:27017/omega", Some("amqp://broker//"));
//! config.cwd = Some("/tmp".into()); // OMEGA_TMP
//! let executor = Executor::new(config);
//!
//! let mut nb = Notebook::parse(r#"{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}"#)?;
//! nb.clear_outputs(); // omega|ml runs ClearOutputPreprocessor unless keep_output
//! let outcome = executor
//!     .run(nb, RunOptions { cell_timeout: Some(Duration::from_secs(60)), ..Default::default() })
//!     .await;
//! let text = outcome.notebook.to_ipynb_string(); // store as results/<name>_<ts>.ipynb
//! if let Some(err) = &outcome.error {
//!     // job_runs status ERROR; message = nbclient-style text
//!     let message = err.to_string();
//! #   let _ = (message, text);
//! }
//! // in the SIGTERM handler:
//! kernels.kill_all();
//! # Ok(()) }
//! ```

pub mod executor;
pub mod json;
pub mod model;
pub mod run_cli;

pub use executor::{
    CellError, Executor, ExecutorConfig, Progress, RunError, RunOptions, RunOutcome, RunTimings,
    StreamMerge,
};
pub use model::{Cell, Notebook, NotebookError};
pub use run_cli::{run_notebook_command, RunNotebookArgs};
