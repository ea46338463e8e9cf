//! Jupyter kernels: launch, talk to, interrupt and reliably stop them.
//!
//! Layers (bottom up):
//! - [`wire`]: Jupyter messages ⇄ ZeroMQ frames (HMAC-SHA256), raw JSON content;
//! - [`client`]: [`KernelClient`], shell/control/iopub channels as one event stream;
//! - [`kernelspec`]: kernelspec discovery;
//! - [`process`]: process groups, exit watching, the [`KernelTracker`] that ends every kernel
//!   at shutdown;
//! - [`launcher`]: the [`KernelLauncher`] trait and [`LocalLauncher`];
//! - [`forkserver`]: [`ForkServerLauncher`], kernels forked from a Python that has already
//!   imported ipykernel and omegaml (falls back to [`LocalLauncher`]); by default a forked
//!   child is ipykernel's shell prepared before the fork, reached over one Unix socket
//!   ([`KernelMode::Shell`], `python/om_shell.py`), else a full ipykernel app;
//! - [`pool`]: [`PooledLauncher`], pre-started kernels, each used by exactly one run.
//!
//! The notebook executor lives in [`crate::notebook::executor`].

pub mod client;
pub mod forkserver;
pub mod kernelspec;
pub mod launcher;
pub mod pool;
pub mod process;
pub mod wire;

pub use client::{Channel, ClientEvent, ConnectionInfo, KernelClient};
pub use forkserver::{ForkServerConfig, ForkServerLauncher, KernelMode};
pub use kernelspec::{find_kernelspec, KernelSpec};
pub use launcher::{
    sweep_stale_runtime_dirs, Kernel, KernelEnv, KernelLauncher, LaunchOptions, LocalLauncher,
    Transport,
};
pub use pool::{PoolStats, PooledLauncher};
pub use process::{KernelExit, KernelProcess, KernelTracker};
pub use wire::Message;

/// Kernel-level failures (the executor maps them into its run errors).
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// No kernelspec with this name.
    #[error("no such kernel: {0:?} (no kernelspec found; install one or pass --python)")]
    NoSuchKernel(String),
    /// A kernelspec exists but cannot be used.
    #[error("bad kernelspec: {0}")]
    Spec(String),
    /// The kernel did not come up.
    #[error("kernel startup failed: {0}")]
    Startup(String),
    /// The kernel process exited.
    #[error("kernel died: {0}")]
    Died(String),
    /// ZeroMQ / messaging failure.
    #[error("kernel transport: {0}")]
    Transport(String),
}
