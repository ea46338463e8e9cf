//! One [`Config`]: defaults < config file < environment < flags.
//!
//! The environment is read the way omega|ml reads it (`OMEGA_BROKER` else
//! `RABBITMQ_URL`, `OMEGA_WORKER_LABEL` else `CELERY_Q`, ...), so a worker
//! started in a Python worker's environment behaves the same. Resolution is a
//! pure function of its inputs ([`Config::resolve`]); only [`FileConfig::load`]
//! touches the filesystem.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::cli::{LogFormat, WorkerFlags};
use crate::kernel::KernelMode;
use crate::redact::mask_url;

/// The `result_serializer` setting's type; it lives with the result codec
/// that uses it (re-exported so settings code keeps its path).
pub use crate::protocol::result_codec::Serializer;

/// omega|ml's default broker (`omegaml/defaults.py`).
pub const DEFAULT_BROKER: &str = "amqp://admin:foobar@localhost:5672//";
/// omega|ml's default MongoDB URL.
pub const DEFAULT_MONGO_URL: &str = "mongodb://admin:foobar@localhost:27017/omega";
/// omega|ml's default result backend.
pub const DEFAULT_RESULT_BACKEND: &str = "rpc://";
/// omega|ml's default label (queue).
pub const DEFAULT_QUEUE: &str = "default";
/// omega|ml's `OMEGA_TASK_TIMEOUT` default (soft limit, seconds).
pub const DEFAULT_TASK_TIMEOUT: f64 = 1200.0;
/// Hard limit = soft + this (omega|ml: `CELERYD_TASK_TIME_LIMIT = timeout + 30`).
pub const HARD_LIMIT_MARGIN: f64 = 30.0;

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read or parsed.
    #[error("config file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A value is out of range or malformed.
    #[error("invalid setting {name}: {reason}")]
    Invalid {
        /// The setting (flag/env/file key).
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// What to do with task names no handler is registered for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnknownTaskPolicy {
    /// Store FAILURE `NotRegistered` and reject, as the Python worker does.
    Fail,
    /// Republish the message unchanged to this queue (mixed fleets).
    Forward(String),
}

impl std::str::FromStr for UnknownTaskPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "fail" => Ok(UnknownTaskPolicy::Fail),
            Some(("forward", q)) if !q.is_empty() => Ok(UnknownTaskPolicy::Forward(q.to_owned())),
            _ => Err(format!("expected `fail` or `forward:<queue>`, got {s:?}")),
        }
    }
}

/// The config file: every key optional, same names as the flags.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Broker URL.
    pub broker: Option<String>,
    /// Result backend URL.
    pub result_backend: Option<String>,
    /// MongoDB URL.
    pub mongo_url: Option<String>,
    /// Queues.
    pub queues: Option<Vec<String>>,
    /// Concurrency.
    pub concurrency: Option<i64>,
    /// Node name.
    pub hostname: Option<String>,
    /// Log level.
    pub loglevel: Option<String>,
    /// Log format.
    pub log_format: Option<LogFormat>,
    /// Prefetch multiplier.
    pub prefetch_multiplier: Option<u16>,
    /// Task events.
    pub task_events: Option<bool>,
    /// Kernel Python.
    pub python: Option<String>,
    /// Kernel pool size (0 = off; default: concurrency).
    pub kernel_pool: Option<usize>,
    /// Fork kernels from the fork server.
    pub fork_server: Option<bool>,
    /// Start the fork server on the first task that needs it.
    pub lazy_fork_server: Option<bool>,
    /// How notebook kernels are made (`shell` or `ipykernel`).
    pub kernel_mode: Option<String>,
    /// Extra fork-server preload modules.
    pub preload: Option<Vec<String>>,
    /// Soft time limit.
    pub task_timeout: Option<f64>,
    /// Kernel cwd.
    pub tmp_dir: Option<PathBuf>,
    /// TLS for MongoDB and the broker.
    pub use_ssl: Option<bool>,
    /// CA bundle for TLS.
    pub ca_certs_path: Option<PathBuf>,
    /// Redis visibility timeout.
    pub visibility_timeout: Option<u64>,
    /// Redis restore sweep interval.
    pub restore_interval: Option<u64>,
    /// Unknown task policy.
    pub unknown_tasks: Option<String>,
    /// Warm-shutdown grace.
    pub shutdown_grace: Option<u64>,
    /// Heartbeat event interval (s).
    pub heartbeat_interval: Option<f64>,
    /// In-flight lease (s).
    pub lease_seconds: Option<u64>,
    /// Kernel RLIMIT_AS (MiB).
    pub kernel_memory_mb: Option<u64>,
    /// Output kept per notebook run (MiB).
    pub max_output_mb: Option<u64>,
    /// Output kept per cell (MiB).
    pub max_cell_output_mb: Option<u64>,
    /// Stored-result encoding.
    pub result_serializer: Option<String>,
    /// Result expiry (redis backend), seconds.
    pub result_expires: Option<u64>,
    /// Send `execute_scripts` periodically (omega|ml's beat).
    pub beat: Option<bool>,
    /// Beat interval, seconds.
    pub beat_interval: Option<u64>,
}

impl FileConfig {
    /// Reads and parses a TOML config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }
}

/// The effective configuration of one worker process.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Broker URL.
    pub broker_url: String,
    /// Result backend URL.
    pub result_backend: String,
    /// omega|ml MongoDB URL.
    pub mongo_url: String,
    /// Queues (labels) to consume.
    pub queues: Vec<String>,
    /// Concurrent task slots.
    pub concurrency: usize,
    /// Node name (`name@host`), placeholders expanded.
    pub nodename: String,
    /// Log level.
    pub loglevel: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Prefetch multiplier.
    pub prefetch_multiplier: u16,
    /// Send task events.
    pub task_events: bool,
    /// Kernel Python interpreter.
    pub python: String,
    /// Kernels kept ready ahead of tasks (0 = no pool).
    pub kernel_pool: usize,
    /// Fork kernels from a pre-imported Python (falls back to plain processes).
    pub fork_server: bool,
    /// Start the fork server on the first task that needs it, not at start-up.
    pub lazy_fork_server: bool,
    /// How the fork server makes notebook kernels (see [`KernelMode`]).
    pub kernel_mode: KernelMode,
    /// Extra modules the fork server imports (besides its omegaml defaults).
    pub preload: Vec<String>,
    /// Default soft time limit (s).
    pub soft_time_limit: f64,
    /// Default hard time limit (s).
    pub hard_time_limit: f64,
    /// Kernel working directory (`OMEGA_TMP`).
    pub tmp_dir: PathBuf,
    /// TLS on (`OMEGA_USESSL`).
    pub use_ssl: bool,
    /// CA bundle (`CA_CERTS_PATH`).
    pub ca_certs_path: Option<PathBuf>,
    /// Redis broker visibility timeout (s).
    pub visibility_timeout: u64,
    /// Redis broker restore sweep interval (s).
    pub restore_interval: u64,
    /// Unknown task policy.
    pub unknown_tasks: UnknownTaskPolicy,
    /// Warm-shutdown grace (s).
    pub shutdown_grace: u64,
    /// Seconds between `worker-heartbeat` events (sent as `freq`).
    pub heartbeat_interval: f64,
    /// In-flight ledger lease (s): how long until a dead worker's task is re-queued.
    pub lease_seconds: u64,
    /// Kernel address-space limit (MiB); `None` = unlimited.
    pub kernel_memory_mb: Option<u64>,
    /// Output kept per notebook run (MiB).
    pub max_output_mb: u64,
    /// Output kept per cell (MiB).
    pub max_cell_output_mb: u64,
    /// Redis result expiry (s); omega|ml sets 3600.
    pub result_expires: u64,
    /// Encoding of results the client decodes with its own serializer.
    pub result_serializer: Serializer,
    /// Where `/metrics` and `/healthz` are served (`--metrics-addr`); off when `None`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// GPU ids for the task slots (`--gpus`); empty = leave CUDA_VISIBLE_DEVICES alone.
    pub gpus: Vec<String>,
    /// Act as omega|ml's beat: send `execute_scripts` to the first queue.
    pub beat: bool,
    /// Seconds between beat's `execute_scripts` (omega|ml's CELERYBEAT_SCHEDULE: 60).
    pub beat_interval: u64,
}

impl Config {
    /// Resolves flags > env > file > defaults. `env` looks a variable up
    /// (`|k| std::env::var(k).ok()` in production) so tests stay pure.
    pub fn resolve(
        flags: &WorkerFlags,
        env: &dyn Fn(&str) -> Option<String>,
        file: &FileConfig,
        host: &str,
    ) -> Result<Config, ConfigError> {
        let env_any = |names: &[&str]| names.iter().find_map(|n| env(n).filter(|v| !v.is_empty()));
        let parse_env = |name: &'static str| -> Result<Option<f64>, ConfigError> {
            env_any(&[name])
                .map(|v| {
                    v.trim().parse::<f64>().map_err(|e| ConfigError::Invalid {
                        name,
                        reason: format!("{v:?}: {e}"),
                    })
                })
                .transpose()
        };

        let broker_url = flags
            .broker
            .clone()
            .or_else(|| env_any(&["OMEGA_BROKER", "RABBITMQ_URL"]))
            .or_else(|| file.broker.clone())
            .unwrap_or_else(|| DEFAULT_BROKER.to_owned());
        let result_backend = flags
            .result_backend
            .clone()
            .or_else(|| env_any(&["OMEGA_RESULT_BACKEND"]))
            .or_else(|| file.result_backend.clone())
            .unwrap_or_else(|| DEFAULT_RESULT_BACKEND.to_owned());
        let mongo_url = flags
            .mongo_url
            .clone()
            .or_else(|| env_any(&["OMEGA_MONGO_URL", "MONGO_URL"]))
            .or_else(|| file.mongo_url.clone())
            .unwrap_or_else(|| DEFAULT_MONGO_URL.to_owned());
        let queues: Vec<String> = flags
            .queues
            .clone()
            .or_else(|| env_any(&["OMEGA_WORKER_LABEL", "CELERY_Q"]).map(|q| split_list(&q)))
            .or_else(|| file.queues.clone())
            .unwrap_or_else(|| vec![DEFAULT_QUEUE.to_owned()])
            .into_iter()
            .map(|q| q.trim().to_owned())
            .filter(|q| !q.is_empty())
            .collect();
        if queues.is_empty() {
            return Err(ConfigError::Invalid {
                name: "queues",
                reason: "no queue given".into(),
            });
        }
        let concurrency = match flags
            .concurrency
            .or(parse_env("OMEGA_WORKER_CONCURRENCY")?.map(|c| c as i64))
            .or(file.concurrency)
        {
            Some(c) if c > 0 => c as usize,
            Some(_) => std::thread::available_parallelism().map_or(1, |n| n.get()),
            None => 4,
        };
        let soft_time_limit = flags
            .task_timeout
            .or(parse_env("OMEGA_TASK_TIMEOUT")?)
            .or(file.task_timeout)
            .unwrap_or(DEFAULT_TASK_TIMEOUT);
        if !(soft_time_limit > 0.0 && soft_time_limit.is_finite()) {
            return Err(ConfigError::Invalid {
                name: "task_timeout",
                reason: format!("must be a positive number of seconds, got {soft_time_limit}"),
            });
        }
        let unknown_tasks = flags
            .unknown_tasks
            .clone()
            .or_else(|| env_any(&["OM_WORKER_UNKNOWN_TASKS"]))
            .or_else(|| file.unknown_tasks.clone())
            .map(|s| s.parse())
            .transpose()
            .map_err(|reason| ConfigError::Invalid {
                name: "unknown_tasks",
                reason,
            })?
            .unwrap_or(UnknownTaskPolicy::Fail);
        let result_serializer = flags
            .result_serializer
            .clone()
            .or_else(|| env_any(&["OMEGA_CELERY_RESULT_SERIALIZER"]))
            .or_else(|| file.result_serializer.clone())
            .map(|s| s.parse())
            .transpose()
            .map_err(|reason| ConfigError::Invalid {
                name: "result_serializer",
                reason,
            })?
            .unwrap_or(Serializer::Pickle);
        // omega|ml's `truefalse()`: true when it starts with y, t or 1 (any case).
        let use_ssl = flags.use_ssl
            || env_any(&["OMEGA_USESSL"])
                .map(|v| v.to_ascii_lowercase().starts_with(['y', 't', '1']))
                .or(file.use_ssl)
                .unwrap_or(false);
        let gpus = match flags.gpus.as_deref().map(str::trim) {
            None | Some("") => Vec::new(),
            Some("auto") => env("CUDA_VISIBLE_DEVICES")
                .map(|v| split_list(&v))
                .unwrap_or_default(),
            Some(list) => split_list(list),
        }
        .into_iter()
        .map(|g| g.trim().to_owned())
        .filter(|g| !g.is_empty())
        .collect();
        let fork_server = if flags.no_fork_server {
            false
        } else if flags.fork_server {
            true
        } else {
            env_any(&["OM_WORKER_FORK_SERVER"])
                .map(|v| {
                    !matches!(
                        v.to_ascii_lowercase().as_str(),
                        "0" | "false" | "no" | "off"
                    )
                })
                .or(file.fork_server)
                .unwrap_or(true)
        };
        let kernel_mode: KernelMode = match flags
            .kernel_mode
            .clone()
            .or_else(|| env_any(&["OM_WORKER_KERNEL_MODE"]))
            .or_else(|| file.kernel_mode.clone())
        {
            Some(v) => v.parse().map_err(|reason| ConfigError::Invalid {
                name: "kernel_mode",
                reason,
            })?,
            None => KernelMode::default(),
        };
        // flags > env > file > default: none when forked shells start in milliseconds, else the
        // concurrency (one ready kernel per task slot).
        let default_pool = if fork_server && kernel_mode == KernelMode::Shell {
            0
        } else {
            concurrency
        };
        let kernel_pool = match flags.kernel_pool {
            Some(n) => n,
            None => match env_any(&["OM_WORKER_KERNEL_POOL"]) {
                Some(v) => v.trim().parse().map_err(|e| ConfigError::Invalid {
                    name: "kernel_pool",
                    reason: format!("{v:?}: {e}"),
                })?,
                None => file.kernel_pool.unwrap_or(default_pool),
            },
        };
        let preload: Vec<String> = flags
            .preload
            .clone()
            .or_else(|| env_any(&["OM_WORKER_PRELOAD"]).map(|v| split_list(&v)))
            .or_else(|| file.preload.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.trim().to_owned())
            .filter(|m| !m.is_empty())
            .collect();
        let nodename_pattern = flags
            .hostname
            .clone()
            .or_else(|| file.hostname.clone())
            .unwrap_or_else(|| "om-worker@%h".to_owned());

        Ok(Config {
            broker_url,
            result_backend,
            mongo_url,
            queues,
            concurrency,
            nodename: expand_nodename(&nodename_pattern, host),
            loglevel: flags
                .loglevel
                .clone()
                .or_else(|| file.loglevel.clone())
                .unwrap_or_else(|| "info".to_owned()),
            log_format: flags
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Human),
            prefetch_multiplier: flags
                .prefetch_multiplier
                .or(file.prefetch_multiplier)
                .unwrap_or(4),
            task_events: flags.task_events || file.task_events.unwrap_or(false),
            python: flags
                .python
                .clone()
                .or_else(|| env_any(&["OM_WORKER_PYTHON"]))
                .or_else(|| file.python.clone())
                .unwrap_or_else(|| "python3".to_owned()),
            kernel_pool,
            fork_server,
            lazy_fork_server: flags.lazy_fork_server
                || env_any(&["OM_WORKER_LAZY_FORK_SERVER"]).is_some_and(|v| {
                    !matches!(
                        v.to_ascii_lowercase().as_str(),
                        "0" | "false" | "no" | "off"
                    )
                })
                || file.lazy_fork_server.unwrap_or(false),
            kernel_mode,
            preload,
            soft_time_limit,
            hard_time_limit: soft_time_limit + HARD_LIMIT_MARGIN,
            tmp_dir: flags
                .tmp_dir
                .clone()
                .or_else(|| env_any(&["OMEGA_TMP"]).map(PathBuf::from))
                .or_else(|| file.tmp_dir.clone())
                .unwrap_or_else(|| PathBuf::from("/tmp")),
            use_ssl,
            ca_certs_path: flags
                .ca_certs
                .clone()
                .or_else(|| env_any(&["CA_CERTS_PATH"]).map(PathBuf::from))
                .or_else(|| file.ca_certs_path.clone()),
            visibility_timeout: flags
                .visibility_timeout
                .or(file.visibility_timeout)
                .unwrap_or(3600),
            restore_interval: flags
                .restore_interval
                .or(file.restore_interval)
                .unwrap_or(60),
            unknown_tasks,
            shutdown_grace: flags.shutdown_grace.or(file.shutdown_grace).unwrap_or(60),
            heartbeat_interval: flags
                .heartbeat_interval
                .or_else(|| env_any(&["OM_WORKER_HEARTBEAT_INTERVAL"]).and_then(|v| v.parse().ok()))
                .or(file.heartbeat_interval)
                .filter(|s| s.is_finite() && *s >= 0.01)
                .unwrap_or(crate::control::events::HEARTBEAT_FREQ),
            lease_seconds: flags
                .lease_seconds
                .or(file.lease_seconds)
                .unwrap_or(60)
                .max(1),
            kernel_memory_mb: flags
                .kernel_memory_mb
                .or(file.kernel_memory_mb)
                .filter(|m| *m > 0),
            max_output_mb: flags
                .max_output_mb
                .or(file.max_output_mb)
                .unwrap_or(50)
                .max(1),
            max_cell_output_mb: flags
                .max_cell_output_mb
                .or(file.max_cell_output_mb)
                .unwrap_or(10)
                .max(1),
            result_expires: file.result_expires.unwrap_or(3600),
            result_serializer,
            metrics_addr: flags.metrics_addr,
            gpus,
            beat: flags.beat || file.beat.unwrap_or(false),
            beat_interval: flags
                .beat_interval
                .or(file.beat_interval)
                .unwrap_or(60)
                .max(1),
        })
    }

    /// The worker-wide TLS settings brokers and backends combine with their
    /// URL's own (see [`crate::tls`]).
    pub fn worker_tls(&self) -> crate::tls::WorkerTls {
        crate::tls::WorkerTls {
            use_ssl: self.use_ssl,
            ca_certs: self.ca_certs_path.clone(),
        }
    }

    /// The MongoDB URL om-worker's own client parses: `mongo_url` with
    /// omega|ml's `OMEGA_USESSL`/`CA_CERTS_PATH` applied
    /// ([`crate::tls::mongo_client_url`]). Kernels get `mongo_url` itself and
    /// apply them through omega|ml.
    pub fn mongo_client_url(&self) -> String {
        crate::tls::mongo_client_url(&self.mongo_url, self.use_ssl, self.ca_certs_path.as_deref())
    }

    /// `concurrency × prefetch_multiplier`, capped to what AMQP can express.
    pub fn prefetch_count(&self) -> u16 {
        prefetch_for(self.concurrency, self.prefetch_multiplier)
    }

    /// The settings as remote control `conf` answers them: the keys omega|ml's
    /// Python worker answers with (omega|ml configures Celery with its old
    /// setting names, see `omegaml/defaults.py` `OMEGA_CELERY_CONFIG`) plus the
    /// old Celery names of om-worker's other effective settings. URLs carry
    /// no password (`********`, as Celery's `filter_hidden_settings`).
    pub fn celery_settings(&self) -> serde_json::Value {
        use crate::redact::mask_url_as;
        serde_json::json!({
            "CELERY_ACCEPT_CONTENT": ["pickle", "json"],
            "CELERY_TASK_SERIALIZER": "pickle",
            "CELERY_RESULT_SERIALIZER": self.result_serializer.as_str(),
            "CELERY_RESULT_EXPIRES": self.result_expires,
            "CELERY_TASK_RESULT_EXPIRES": self.result_expires,
            "CELERY_DEFAULT_QUEUE": self.queues.first().cloned().unwrap_or_else(|| DEFAULT_QUEUE.to_owned()),
            "BROKER_URL": mask_url_as(&self.broker_url, "********"),
            "BROKER_HEARTBEAT": 0,
            "CELERY_RESULT_BACKEND": mask_url_as(&self.result_backend, "********"),
            "CELERY_ALWAYS_EAGER": false,
            "CELERY_TRACK_STARTED": true,
            "CELERYBEAT_SCHEDULE": {
                "execute_scripts": {
                    "task": "omegaml.notebook.tasks.execute_scripts",
                    "schedule": self.beat_interval,
                }
            },
            "CELERYD_TASK_SOFT_TIME_LIMIT": self.soft_time_limit,
            "CELERYD_TASK_TIME_LIMIT": self.hard_time_limit,
            "BROKER_USE_SSL": self.use_ssl,
            "BROKER_CONNECTION_RETRY_ON_STARTUP": true,
            "CELERYD_CONCURRENCY": self.concurrency,
            "deprecated_settings": null,
            "CELERYD_PREFETCH_MULTIPLIER": self.prefetch_multiplier,
            // omega|ml acks a task when it starts.
            "CELERY_ACKS_LATE": false,
            "CELERY_SEND_EVENTS": self.task_events,
            "CELERY_QUEUES": self.queues,
            "CELERY_DISABLE_RATE_LIMITS": false,
            // Set by Celery's `worker` command.
            "worker_disable_prefetch": false,
        })
    }

    /// The configuration as `key = value` lines, every URL's password masked.
    pub fn render_masked(&self) -> String {
        let mut out = String::new();
        let mut line = |k: &str, v: String| out.push_str(&format!("{k} = {v}\n"));
        line("broker", quoted(&mask_url(&self.broker_url)));
        line("result_backend", quoted(&mask_url(&self.result_backend)));
        line("mongo_url", quoted(&mask_url(&self.mongo_url)));
        line(
            "queues",
            format!(
                "[{}]",
                self.queues
                    .iter()
                    .map(|q| quoted(q))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        line("concurrency", self.concurrency.to_string());
        line("hostname", quoted(&self.nodename));
        line("loglevel", quoted(&self.loglevel));
        line(
            "log_format",
            quoted(match self.log_format {
                LogFormat::Human => "human",
                LogFormat::Json => "json",
            }),
        );
        line("prefetch_multiplier", self.prefetch_multiplier.to_string());
        line("task_events", self.task_events.to_string());
        line("python", quoted(&self.python));
        line("kernel_pool", self.kernel_pool.to_string());
        line("fork_server", self.fork_server.to_string());
        line("lazy_fork_server", self.lazy_fork_server.to_string());
        line("kernel_mode", quoted(&self.kernel_mode.to_string()));
        line(
            "preload",
            format!(
                "[{}]",
                self.preload
                    .iter()
                    .map(|m| quoted(m))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        line("task_timeout", self.soft_time_limit.to_string());
        line("# hard time limit", self.hard_time_limit.to_string());
        line("tmp_dir", quoted(&self.tmp_dir.display().to_string()));
        line("use_ssl", self.use_ssl.to_string());
        if let Some(p) = &self.ca_certs_path {
            line("ca_certs_path", quoted(&p.display().to_string()));
        }
        // What each connection will trust (paths only), from the URLs' own ssl_* parameters too.
        let tls = self.worker_tls();
        for (name, url) in [
            ("broker", &self.broker_url),
            ("result_backend", &self.result_backend),
        ] {
            match crate::tls::for_url(url, &tls) {
                Ok((_, Some(s))) => line(&format!("# {name} tls"), quoted(&s.trust())),
                Ok((_, None)) => {}
                Err(e) => line(&format!("# {name} tls"), quoted(&format!("invalid: {e}"))),
            }
        }
        if crate::tls::mongo_uses_tls(&self.mongo_client_url()) {
            let trust = match &self.ca_certs_path {
                Some(ca) if self.use_ssl => format!("CA file {}", ca.display()),
                _ => "the URL's tlsCAFile, else system roots".to_owned(),
            };
            line("# mongo tls", quoted(&trust));
        }
        line("visibility_timeout", self.visibility_timeout.to_string());
        line("restore_interval", self.restore_interval.to_string());
        line(
            "unknown_tasks",
            quoted(&match &self.unknown_tasks {
                UnknownTaskPolicy::Fail => "fail".to_owned(),
                UnknownTaskPolicy::Forward(q) => format!("forward:{q}"),
            }),
        );
        line("shutdown_grace", self.shutdown_grace.to_string());
        line("heartbeat_interval", self.heartbeat_interval.to_string());
        line("lease_seconds", self.lease_seconds.to_string());
        match self.kernel_memory_mb {
            Some(m) => line("kernel_memory_mb", m.to_string()),
            None => line("# kernel_memory_mb", "unlimited".into()),
        }
        line("max_output_mb", self.max_output_mb.to_string());
        line("max_cell_output_mb", self.max_cell_output_mb.to_string());
        line("result_expires", self.result_expires.to_string());
        line("result_serializer", quoted(self.result_serializer.as_str()));
        if let Some(a) = &self.metrics_addr {
            line("# metrics_addr", quoted(&a.to_string()));
        }
        if !self.gpus.is_empty() {
            line("# gpus", quoted(&self.gpus.join(",")));
        }
        line("beat", self.beat.to_string());
        line("beat_interval", self.beat_interval.to_string());
        out
    }
}

/// `concurrency × prefetch_multiplier` (Celery's prefetch count; 0 =
/// unlimited), capped to what AMQP's `basic.qos` can express.
pub fn prefetch_for(concurrency: usize, prefetch_multiplier: u16) -> u16 {
    let n = concurrency.saturating_mul(usize::from(prefetch_multiplier));
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn quoted(s: &str) -> String {
    format!("{s:?}")
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',').map(str::to_owned).collect()
}

/// Expands Celery's nodename placeholders: `%h` host, `%n` first label, `%d` domain, `%%`.
pub fn expand_nodename(pattern: &str, host: &str) -> String {
    let (name, domain) = host.split_once('.').unwrap_or((host, ""));
    let mut out = String::with_capacity(pattern.len() + host.len());
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('h') => out.push_str(host),
            Some('n') => out.push_str(name),
            Some('d') => out.push_str(domain),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    if out.contains('@') {
        out
    } else {
        // Celery: a bare name gets `@host` appended.
        format!("{out}@{host}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(map: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = map
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn defaults_are_omegamls() {
        let c = Config::resolve(
            &WorkerFlags::default(),
            &env(&[]),
            &FileConfig::default(),
            "h1",
        )
        .expect("resolves");
        assert_eq!(c.broker_url, DEFAULT_BROKER);
        assert_eq!(c.result_backend, "rpc://");
        assert_eq!(c.queues, vec!["default"]);
        assert_eq!(c.concurrency, 4);
        assert_eq!((c.soft_time_limit, c.hard_time_limit), (1200.0, 1230.0));
        assert_eq!(c.prefetch_count(), 16);
        assert_eq!(c.nodename, "om-worker@h1");
    }

    #[test]
    fn kernel_mode_defaults_to_shell_without_a_pool() {
        let resolve = |flags: &WorkerFlags, e: &[(&str, &str)]| {
            Config::resolve(flags, &env(e), &FileConfig::default(), "h").expect("resolves")
        };
        let c = resolve(&WorkerFlags::default(), &[]);
        assert_eq!((c.kernel_mode, c.kernel_pool), (KernelMode::Shell, 0));
        // full kernel apps (or no fork server) start slowly: one ready kernel per slot
        let c = resolve(
            &WorkerFlags::default(),
            &[("OM_WORKER_KERNEL_MODE", "ipykernel")],
        );
        assert_eq!((c.kernel_mode, c.kernel_pool), (KernelMode::Ipykernel, 4));
        let flags = WorkerFlags {
            no_fork_server: true,
            ..Default::default()
        };
        assert_eq!(resolve(&flags, &[]).kernel_pool, 4);
        let flags = WorkerFlags {
            kernel_mode: Some("SHELL".into()),
            kernel_pool: Some(2),
            ..Default::default()
        };
        let c = resolve(&flags, &[("OM_WORKER_KERNEL_MODE", "ipykernel")]);
        assert_eq!((c.kernel_mode, c.kernel_pool), (KernelMode::Shell, 2));
        let err = Config::resolve(
            &WorkerFlags::default(),
            &env(&[("OM_WORKER_KERNEL_MODE", "zmq")]),
            &FileConfig::default(),
            "h",
        );
        assert!(
            err.is_err(),
            "an unknown mode is an error, not a silent default"
        );
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let file = FileConfig {
            broker: Some("amqp://file//".into()),
            mongo_url: Some("mongodb://file/db".into()),
            queues: Some(vec!["fq".into()]),
            ..Default::default()
        };
        let e = env(&[
            ("RABBITMQ_URL", "amqp://rabbit//"),
            ("OMEGA_BROKER", "amqp://omega//"),
            ("MONGO_URL", "mongodb://env/db"),
            ("CELERY_Q", "a,b"),
            ("OMEGA_TASK_TIMEOUT", "10"),
        ]);
        let c = Config::resolve(&WorkerFlags::default(), &e, &file, "h").expect("resolves");
        assert_eq!(
            c.broker_url, "amqp://omega//",
            "OMEGA_BROKER before RABBITMQ_URL"
        );
        assert_eq!(
            c.mongo_url, "mongodb://env/db",
            "MONGO_URL fallback beats the file"
        );
        assert_eq!(c.queues, vec!["a", "b"]);
        assert_eq!(c.hard_time_limit, 40.0);
        let flags = WorkerFlags {
            broker: Some("redis://flag/0".into()),
            queues: Some(vec!["gpu".into()]),
            ..Default::default()
        };
        let c = Config::resolve(&flags, &e, &file, "h").expect("resolves");
        assert_eq!(c.broker_url, "redis://flag/0");
        assert_eq!(c.queues, vec!["gpu"]);
    }

    #[test]
    fn bad_values_are_named() {
        let err = Config::resolve(
            &WorkerFlags::default(),
            &env(&[("OMEGA_TASK_TIMEOUT", "soon")]),
            &FileConfig::default(),
            "h",
        )
        .unwrap_err();
        assert!(err.to_string().contains("OMEGA_TASK_TIMEOUT"), "{err}");
        let flags = WorkerFlags {
            unknown_tasks: Some("drop".into()),
            ..Default::default()
        };
        let err = Config::resolve(&flags, &env(&[]), &FileConfig::default(), "h").unwrap_err();
        assert!(err.to_string().contains("unknown_tasks"), "{err}");
    }

    #[test]
    fn tls_settings_as_omegaml_reads_them() {
        let resolve = |flags: &WorkerFlags, e: &[(&str, &str)]| {
            Config::resolve(flags, &env(e), &FileConfig::default(), "h").expect("resolves")
        };
        let c = resolve(&WorkerFlags::default(), &[]);
        assert!(!c.use_ssl && c.ca_certs_path.is_none());
        // omega|ml's truefalse(): starts with y, t or 1
        for (v, want) in [
            ("1", true),
            ("true", true),
            ("True", true),
            ("yes", true),
            ("0", false),
            ("false", false),
            ("on", false),
        ] {
            assert_eq!(
                resolve(&WorkerFlags::default(), &[("OMEGA_USESSL", v)]).use_ssl,
                want,
                "{v}"
            );
        }
        let c = resolve(
            &WorkerFlags::default(),
            &[
                ("OMEGA_USESSL", "1"),
                ("CA_CERTS_PATH", "/etc/ca.pem"),
                ("OMEGA_MONGO_URL", "mongodb://u:pw@db:27017/omega"),
                ("OMEGA_BROKER", "amqp://u:pw@mq:5672//"),
            ],
        );
        assert_eq!(c.ca_certs_path.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(
            c.mongo_client_url(),
            "mongodb://u:pw@db:27017/omega?tls=true&tlsCAFile=/etc/ca.pem"
        );
        let shown = c.render_masked();
        assert!(shown.contains("use_ssl = true"), "{shown}");
        assert!(shown.contains("ca_certs_path = \"/etc/ca.pem\""), "{shown}");
        assert!(
            shown.contains("# broker tls = \"system roots + CA file /etc/ca.pem\""),
            "{shown}"
        );
        assert!(
            shown.contains("# mongo tls = \"CA file /etc/ca.pem\""),
            "{shown}"
        );
        assert!(!shown.contains("pw"), "{shown}");
        // flags win
        let flags = WorkerFlags {
            use_ssl: true,
            ca_certs: Some("/flag.pem".into()),
            ..Default::default()
        };
        let c = resolve(&flags, &[("CA_CERTS_PATH", "/env.pem")]);
        assert!(c.use_ssl);
        assert_eq!(c.ca_certs_path.as_deref(), Some(Path::new("/flag.pem")));
        // a URL's ssl_* parameters are shown as what they mean
        let flags = WorkerFlags {
            broker: Some("rediss://:pw@r:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/r.pem".into()),
            ..Default::default()
        };
        let shown = resolve(&flags, &[]).render_masked();
        assert!(
            shown.contains("# broker tls = \"CA file /r.pem (ssl_ca_certs)\""),
            "{shown}"
        );
    }

    #[test]
    fn nodename_placeholders() {
        assert_eq!(
            expand_nodename("w1@%h", "box.example.com"),
            "w1@box.example.com"
        );
        assert_eq!(
            expand_nodename("%n-x@%d", "box.example.com"),
            "box-x@example.com"
        );
        assert_eq!(expand_nodename("gpu", "box"), "gpu@box");
    }

    #[test]
    fn secrets_are_masked() {
        assert_eq!(
            mask_url("amqp://guest:s3cret@127.0.0.1:5672//"),
            "amqp://guest:***@127.0.0.1:5672//"
        );
        assert_eq!(
            mask_url("mongodb://admin:foo@localhost:27017/omega"),
            "mongodb://admin:***@localhost:27017/omega"
        );
        assert_eq!(mask_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(mask_url("rpc://"), "rpc://");
        let c = Config::resolve(
            &WorkerFlags {
                broker: Some("amqp://u:topsecret@h//".into()),
                ..Default::default()
            },
            &env(&[]),
            &FileConfig::default(),
            "h",
        )
        .expect("resolves");
        assert!(!c.render_masked().contains("topsecret"));
        assert!(!c.render_masked().contains("foobar"));
    }

    #[test]
    fn example_config_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/om-worker.toml");
        let file = FileConfig::load(&path).expect("config/om-worker.toml parses");
        let c = Config::resolve(&WorkerFlags::default(), &env(&[]), &file, "h").expect("resolves");
        assert!(!c.queues.is_empty());
    }
}
