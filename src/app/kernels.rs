//! Notebook-task wiring: the executor, the kernel launcher stack (fork
//! server → pool → executor; no pool by default, see [`Config::kernel_pool`])
//! and their orderly stop, built from a [`Config`].
//!
//! [`NotebookRuntime`] is what the worker's owner holds: it is created with
//! the notebook task and shut down after the last task ended, so nothing
//! starts a kernel after the sweep that ends them. It owns the handles the
//! shutdown needs (the executor's background shutdowns, the launcher stack,
//! the tracker every kernel is registered in); nothing of it is process-wide.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tracing::{info, warn};

use crate::config::Config;
use crate::kernel::{ForkServerLauncher, KernelEnv, KernelLauncher, KernelTracker};
use crate::notebook::executor::{Executor, ExecutorConfig, StreamMerge};
use crate::redact::mask_url;
use crate::store::Store;
use crate::tasks::python_task::{PythonCatalog, PythonRuntime};
use crate::tasks::run_omegaml_job::RunOmegamlJob;

/// The kernels behind the notebook task, stopped by [`NotebookRuntime::shutdown`].
pub struct NotebookRuntime {
    /// The notebook task's executor (shared with the task), for its background
    /// kernel shutdowns.
    executor: Arc<Executor>,
    /// The top of the launcher stack (pool → fork server, or plain): its
    /// [`KernelLauncher::shutdown`] stops pool refills and the fork server
    /// below, in order, before the final sweep. Held here (not only through
    /// the task registry, dropped when the worker loop ends) so an idle pool
    /// is stopped in order rather than left to that sweep.
    launcher: Arc<dyn KernelLauncher>,
    /// The fork server under the pool (also forks the Python task children).
    fork_server: Option<Arc<ForkServerLauncher>>,
    /// Every kernel (and task child) the launchers started, for the final sweep.
    kernels: KernelTracker,
}

impl NotebookRuntime {
    /// The Python tasks omega|ml registers (model, script, genai, …), each run
    /// in a child forked from the same fork server as the kernels; `native`
    /// are the names om-worker runs itself.
    pub fn python_tasks(&self, config: &Config, native: &[&'static str]) -> Arc<PythonCatalog> {
        let runtime = PythonRuntime::new(
            self.fork_server.clone(),
            std::path::PathBuf::from(&config.python),
            kernel_env(config).build(),
            config.tmp_dir.clone(),
            config.result_serializer,
            kernel_memory_limit(config),
            self.kernels.clone(),
        );
        Arc::new(PythonCatalog::new(
            Arc::new(runtime),
            native.iter().map(|n| n.to_string()),
        ))
    }

    /// Stops pool refills and the fork server, then ends every kernel still
    /// alive. Call after the worker's last task ended.
    pub async fn shutdown(self) {
        if !self
            .executor
            .wait_background_shutdowns(Duration::from_secs(5))
            .await
        {
            warn!("kernels still shutting down after 5 s; killing them");
        }
        // The pool's shutdown shuts the launcher it wraps (the fork server) down too.
        self.launcher.shutdown().await;
        // Belt and braces: no kernel outlives the worker, whatever happened above.
        let killed = self.kernels.kill_all();
        if killed > 0 {
            warn!("killed {killed} kernel process group(s) left at shutdown");
        }
    }
}

/// The notebook task: one pooled MongoDB client and one executor for all runs.
pub async fn notebook_task(config: &Config) -> anyhow::Result<(RunOmegamlJob, NotebookRuntime)> {
    let store = Store::connect(&config.mongo_client_url(), Duration::from_secs(5))
        .await
        .with_context(|| format!("MongoDB {}", mask_url(&config.mongo_url)))?;
    std::fs::create_dir_all(&config.tmp_dir)
        .with_context(|| format!("kernel working directory {}", config.tmp_dir.display()))?;
    let kernels = KernelTracker::new();
    let (launcher, fork_server) = kernel_launcher(config, &kernels);
    let mut executor_config = ExecutorConfig::new(Arc::clone(&launcher));
    // The Python worker (nbconvert/nbclient defaults) stores one output per
    // iopub message; so do we, for identical results notebooks.
    executor_config.stream_merge = StreamMerge::None;
    // Free the slot (and send the result) without waiting for ipykernel's shutdown.
    executor_config.background_shutdown = true;
    executor_config.memory_limit_bytes = kernel_memory_limit(config);
    if let Some(mb) = config
        .kernel_memory_mb
        .filter(|mb| *mb < KERNEL_MEMORY_MIN_MB)
    {
        warn!(
            "--kernel-memory-mb {mb} is below {KERNEL_MEMORY_MIN_MB}: it limits address space, and \
             kernels usually fail to start under it (thread stacks and malloc arenas count)"
        );
    }
    executor_config.max_total_output_bytes = mib(config.max_output_mb);
    executor_config.max_cell_output_bytes = mib(config.max_cell_output_mb);
    let executor = Arc::new(Executor::new(executor_config));
    let task = RunOmegamlJob::new(
        store,
        Arc::clone(&executor),
        // exactly the fork server's and the pool's: a kernel env that differs
        // in one variable is neither forked nor taken from the pool
        kernel_env(config),
        config.tmp_dir.clone(),
    );
    let runtime = NotebookRuntime {
        executor,
        launcher,
        fork_server,
        kernels,
    };
    Ok((task, runtime))
}

/// `--kernel-memory-mb` in bytes (the executor and the pool template must agree).
fn kernel_memory_limit(config: &Config) -> Option<u64> {
    config.kernel_memory_mb.map(|m| m.saturating_mul(1 << 20))
}

/// Below this address-space limit ipykernel cannot start its threads (each
/// thread stack and malloc arena counts against RLIMIT_AS).
const KERNEL_MEMORY_MIN_MB: u64 = 1024;

fn mib(m: u64) -> usize {
    usize::try_from(m.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
}

/// The kernel launcher of the notebook task: fork server (falls back to plain processes) →
/// pool of ready kernels → executor. The pool's template is what `RunOmegamlJob` asks for
/// (python3, [`KernelEnv::omega`], cwd `OMEGA_TMP`), so its kernels match every task; other
/// requests (another kernelspec) bypass the pool and, if not forkable, the fork server.
/// Every kernel is registered in `kernels`.
fn kernel_launcher(
    config: &Config,
    kernels: &KernelTracker,
) -> (Arc<dyn KernelLauncher>, Option<Arc<ForkServerLauncher>>) {
    use crate::kernel::{ForkServerConfig, LaunchOptions, LocalLauncher, PooledLauncher};
    let python = std::path::PathBuf::from(&config.python);
    let env = kernel_env(config);
    let fork_server = config.fork_server.then(|| {
        let mut fs = ForkServerConfig::new(python.clone());
        fs.preload = config.preload.clone();
        fs.env = env.clone();
        fs.cwd = Some(config.tmp_dir.clone());
        fs.kernel_mode = config.kernel_mode;
        Arc::new(ForkServerLauncher::new(fs, kernels.clone()))
    });
    let base: Arc<dyn KernelLauncher> = match &fork_server {
        Some(fs) => Arc::clone(fs) as Arc<dyn KernelLauncher>,
        None => Arc::new(LocalLauncher::new(python, kernels.clone())),
    };
    let launcher: Arc<dyn KernelLauncher> = if config.kernel_pool > 0 {
        let template = LaunchOptions {
            env,
            cwd: Some(config.tmp_dir.clone()),
            memory_limit_bytes: kernel_memory_limit(config),
            ..LaunchOptions::default()
        };
        let pool = Arc::new(PooledLauncher::new(base, template, config.kernel_pool));
        // The `kernels_ready` gauge follows the pool's fill; the task ends with the pool.
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            while let Some(pool) = weak.upgrade() {
                crate::telemetry::set_kernels_ready(pool.stats().ready);
                drop(pool);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        pool
    } else {
        base
    };
    info!(
        fork_server = config.fork_server,
        kernel_mode = %config.kernel_mode,
        kernel_pool = config.kernel_pool,
        "kernel launcher"
    );
    (launcher, fork_server)
}

/// The environment kernels and task children get: omega|ml's, as the Python
/// worker gives its tasks, with the worker's own MongoDB, broker and result
/// backend (a task's Celery app publishes callbacks and retries and counts
/// chord parts there).
///
/// TLS set by flag or config file reaches them as the variables omega|ml
/// reads (`OMEGA_USESSL`, `CA_CERTS_PATH`); set by environment they are
/// inherited as they are.
/// An `amqp(s)://` broker URL loses kombu's `ssl_*` parameters on the way:
/// py-amqp takes its TLS options from `broker_use_ssl` and fails on them.
fn kernel_env(config: &Config) -> KernelEnv {
    let broker = match config.broker_url.split_once("://") {
        Some(("amqp" | "amqps" | "pyamqp" | "pyamqps", _)) => {
            crate::tls::split_ssl_params(&config.broker_url)
                .map(|(url, _)| url)
                .unwrap_or_else(|_| config.broker_url.clone())
        }
        _ => config.broker_url.clone(),
    };
    let mut env = KernelEnv::omega(&config.mongo_url, Some(&broker))
        .with("OMEGA_RESULT_BACKEND", &config.result_backend);
    if config.use_ssl {
        env = env.with("OMEGA_USESSL", "1");
    }
    if let Some(ca) = &config.ca_certs_path {
        env = env.with("CA_CERTS_PATH", ca.display().to_string());
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::WorkerFlags;
    use crate::config::FileConfig;

    fn config(flags: WorkerFlags) -> Config {
        Config::resolve(&flags, &|_| None, &FileConfig::default(), "h").expect("resolves")
    }

    #[test]
    fn kernels_get_tls_as_omegaml_reads_it() {
        let c = config(WorkerFlags {
            broker: Some(
                "amqps://u:p@mq:5671//?ssl_ca_certs=/ca.pem&ssl_check_hostname=false".into(),
            ),
            use_ssl: true,
            ca_certs: Some("/etc/ca.pem".into()),
            ..Default::default()
        });
        let env = kernel_env(&c);
        assert_eq!(
            env.set.get("OMEGA_BROKER").map(String::as_str),
            Some("amqps://u:p@mq:5671//"),
            "py-amqp cannot take kombu's ssl_* URL parameters"
        );
        assert_eq!(env.set.get("OMEGA_USESSL").map(String::as_str), Some("1"));
        assert_eq!(
            env.set.get("CA_CERTS_PATH").map(String::as_str),
            Some("/etc/ca.pem")
        );
        // Redis URLs keep them: kombu's Redis transport and Celery's backend read them.
        let url = "rediss://r:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem";
        let env = kernel_env(&config(WorkerFlags {
            broker: Some(url.into()),
            ..Default::default()
        }));
        assert_eq!(env.set.get("OMEGA_BROKER").map(String::as_str), Some(url));
        assert!(!env.set.contains_key("OMEGA_USESSL"));
    }
}
