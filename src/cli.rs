//! Command-line flags, in the style of `celery worker`.
//!
//! Flags only say what the user typed (`Option`s); [`crate::config::Config::resolve`]
//! layers them over the environment, the config file and the defaults.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// om-worker: a drop-in Rust worker for omega|ml's Celery queues.
#[derive(Debug, Parser)]
#[command(name = "om-worker", version, about, long_about = None)]
pub struct Cli {
    /// Config file (TOML); see config/om-worker.toml. Env: OM_WORKER_CONFIG.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume the queues and run tasks (like `celery worker`).
    Worker(WorkerFlags),
    /// Print the effective configuration, secrets masked.
    Config(WorkerFlags),
    /// Connect to broker, MongoDB and result backend and find the kernel Python;
    /// exits non-zero naming whatever is unreachable.
    Check(WorkerFlags),
    /// Run a local notebook in a fresh kernel, with cell-by-cell progress.
    RunNotebook(RunNotebookFlags),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Flags shared by `worker`, `config` and `check`.
#[derive(Debug, Clone, Default, Args)]
pub struct WorkerFlags {
    /// Queues (labels) to consume, comma-separated. Env: OMEGA_WORKER_LABEL, CELERY_Q.
    #[arg(short = 'Q', long = "queues", value_delimiter = ',')]
    pub queues: Option<Vec<String>>,
    /// Concurrent task slots (≤ 0 = CPU count). Env: OMEGA_WORKER_CONCURRENCY.
    #[arg(short = 'c', long)]
    pub concurrency: Option<i64>,
    /// Node name; %h = hostname, %n = its first label, %d = its domain.
    #[arg(short = 'n', long)]
    pub hostname: Option<String>,
    /// Log level: trace, debug, info, warning, error.
    #[arg(short = 'l', long)]
    pub loglevel: Option<String>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Prefetch = concurrency × this (0 = unlimited).
    #[arg(long)]
    pub prefetch_multiplier: Option<u16>,
    /// Send task events (task-received/started/succeeded/failed).
    #[arg(short = 'E', long)]
    pub task_events: bool,
    /// Broker URL (amqp:// or redis://). Env: OMEGA_BROKER, RABBITMQ_URL.
    #[arg(long)]
    pub broker: Option<String>,
    /// Result backend (rpc://, redis://, mongodb://). Env: OMEGA_RESULT_BACKEND.
    #[arg(long)]
    pub result_backend: Option<String>,
    /// omega|ml MongoDB URL (database = path). Env: OMEGA_MONGO_URL, MONGO_URL.
    #[arg(long)]
    pub mongo_url: Option<String>,
    /// TLS for MongoDB and an `amqp://` broker, as omega|ml's OMEGA_USESSL
    /// (`amqps://`/`rediss://` URLs use TLS anyway). Env: OMEGA_USESSL.
    #[arg(long)]
    pub use_ssl: bool,
    /// CA bundle (PEM) for MongoDB TLS, also trusted besides the system roots
    /// for broker/backend TLS (a URL's `ssl_ca_certs` replaces both). Env: CA_CERTS_PATH.
    #[arg(long, value_name = "FILE")]
    pub ca_certs: Option<PathBuf>,
    /// Python interpreter for kernels. Env: OM_WORKER_PYTHON.
    #[arg(long)]
    pub python: Option<String>,
    /// Kernels kept started and ready ahead of tasks (0 = off). Default: none with
    /// `--kernel-mode shell` on the fork server (a kernel then starts in milliseconds), else the
    /// concurrency. Each is used by one task only. Env: OM_WORKER_KERNEL_POOL.
    #[arg(long, value_name = "N")]
    pub kernel_pool: Option<usize>,
    /// Fork kernels from a server that imported ipykernel and omegaml once (default on;
    /// falls back to plain kernel processes when it cannot start). Env: OM_WORKER_FORK_SERVER.
    #[arg(long, overrides_with = "no_fork_server")]
    pub fork_server: bool,
    /// Start every kernel as a fresh process (no fork server).
    #[arg(long, overrides_with = "fork_server")]
    pub no_fork_server: bool,
    /// Start the fork server on the first task that needs it instead of at start-up (saves its
    /// memory and the seconds of its imports on a worker that may never run a notebook or Python
    /// task; that first task then waits for them). Env: OM_WORKER_LAZY_FORK_SERVER.
    #[arg(long)]
    pub lazy_fork_server: bool,
    /// How the fork server makes a notebook's kernel: `shell` (default: ipykernel's shell
    /// prepared once before the fork, the child only runs the cells, over one Unix socket) or
    /// `ipykernel` (a full ipykernel app per run, forked). Kernelspecs that are not the fork
    /// server's Python always start as their own process. Env: OM_WORKER_KERNEL_MODE.
    #[arg(long, value_name = "MODE")]
    pub kernel_mode: Option<String>,
    /// Extra modules the fork server imports once, comma-separated (in addition to omegaml).
    /// Env: OM_WORKER_PRELOAD.
    #[arg(long, value_delimiter = ',', value_name = "MODS")]
    pub preload: Option<Vec<String>>,
    /// Soft time limit per task in seconds (hard = soft + 30). Env: OMEGA_TASK_TIMEOUT.
    #[arg(long)]
    pub task_timeout: Option<f64>,
    /// Working directory of kernels. Env: OMEGA_TMP.
    #[arg(long)]
    pub tmp_dir: Option<PathBuf>,
    /// Redis broker: seconds before an unacked message is restored to its queue.
    #[arg(long)]
    pub visibility_timeout: Option<u64>,
    /// Redis broker: seconds between restore sweeps.
    #[arg(long)]
    pub restore_interval: Option<u64>,
    /// Unknown task names: `fail` (FAILURE NotRegistered) or `forward:<queue>`.
    #[arg(long)]
    pub unknown_tasks: Option<String>,
    /// Encoding of stored results (redis/mongodb backends): pickle (omega|ml) or json.
    /// Env: OMEGA_CELERY_RESULT_SERIALIZER.
    #[arg(long)]
    pub result_serializer: Option<String>,
    /// Seconds a worker's in-flight lease lasts; a task whose worker stops
    /// renewing it (died) is re-queued by another worker after this long, and
    /// on Redis so are the messages it held without running them (prefetched,
    /// waiting for a slot or an ETA).
    #[arg(long)]
    pub lease_seconds: Option<u64>,
    /// Seconds running tasks get to finish on a warm shutdown.
    #[arg(long)]
    pub shutdown_grace: Option<u64>,
    /// Seconds between worker heartbeat events (Celery's
    /// `--heartbeat-interval`, default 2). Env: OM_WORKER_HEARTBEAT_INTERVAL.
    #[arg(long)]
    pub heartbeat_interval: Option<f64>,
    /// Address-space limit (RLIMIT_AS) of each kernel, in MiB: a notebook
    /// that allocates more gets MemoryError (or dies) instead of taking the
    /// host down. Off by default, like omega|ml's worker.
    #[arg(long, value_name = "MIB")]
    pub kernel_memory_mb: Option<u64>,
    /// Output kept per notebook run, in MiB (default 50); beyond it outputs
    /// are truncated with a visible marker, so an output flood never grows
    /// the worker's memory.
    #[arg(long, value_name = "MIB")]
    pub max_output_mb: Option<u64>,
    /// Output kept per cell, in MiB (default 10).
    #[arg(long, value_name = "MIB")]
    pub max_cell_output_mb: Option<u64>,
    /// Serve Prometheus metrics (/metrics) and /healthz on this address,
    /// e.g. 127.0.0.1:9808. Off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// GPUs for the task slots, comma-separated (slot i gets
    /// CUDA_VISIBLE_DEVICES=gpus[i % n]); `auto` = the CUDA_VISIBLE_DEVICES
    /// the worker was started with.
    #[arg(long, value_name = "LIST|auto")]
    pub gpus: Option<String>,
    /// Also act as omega|ml's `celery beat`: send `execute_scripts` to the
    /// first queue every --beat-interval seconds (scheduled notebooks).
    /// Run at most one beat per cluster: there is no locking.
    #[arg(long)]
    pub beat: bool,
    /// Seconds between beat's `execute_scripts` (omega|ml: 60).
    #[arg(long, value_name = "SECS")]
    pub beat_interval: Option<u64>,
}

/// Flags of `run-notebook`.
#[derive(Debug, Clone, Args)]
pub struct RunNotebookFlags {
    /// Notebook to run.
    pub input: PathBuf,
    /// Where to write the executed notebook (written even when a cell fails).
    pub output: PathBuf,
    /// Whole-run timeout in seconds.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Per-cell timeout in seconds.
    #[arg(long)]
    pub cell_timeout: Option<f64>,
    /// Python interpreter for the kernel. Env: OM_WORKER_PYTHON.
    #[arg(long, env = "OM_WORKER_PYTHON")]
    pub python: Option<String>,
    /// Kernel name (default: the notebook's kernelspec, else python3).
    #[arg(long)]
    pub kernel_name: Option<String>,
}
