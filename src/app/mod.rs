//! Wiring: builds the broker, backend and registry a [`Config`] names, and
//! implements the `worker`, `config` and `check` commands on top of them.

pub mod kernels;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tracing::{info, warn};

use crate::backend::{self, ResultBackend};
use crate::broker::Broker;
use crate::config::Config;
use crate::control::WorkerState;
use crate::ledger::MongoLedger;
use crate::redact::mask_url;
use crate::shutdown::{Services, Shutdown};
use crate::store::Store;
use crate::tasks::execute_scripts::{run_beat, ExecuteScripts};
use crate::tasks::schedule_omegaml_job::ScheduleOmegamlJob;
use crate::tasks::Registry;
use crate::worker::Worker;

/// Connects to the broker the URL names.
pub async fn connect_broker(config: &Config) -> anyhow::Result<Arc<dyn Broker>> {
    let options = crate::broker::BrokerOptions {
        redis: crate::broker::redis::RedisOptions {
            visibility_timeout: Duration::from_secs(config.visibility_timeout),
            restore_interval: Duration::from_secs(config.restore_interval.max(1)),
            holder_lease: Some(Duration::from_secs(config.lease_seconds.max(1))),
            ..Default::default()
        },
        tls: config.worker_tls(),
        ..Default::default()
    };
    Ok(crate::broker::from_url(&config.broker_url, options).await?)
}

/// Builds the result backend.
pub async fn connect_backend(
    config: &Config,
    broker: Arc<dyn Broker>,
) -> anyhow::Result<Arc<dyn ResultBackend>> {
    backend::from_url(
        &config.result_backend,
        broker,
        &config.mongo_url,
        config.result_expires,
        config.result_serializer,
        &config.worker_tls(),
    )
    .await
    .with_context(|| format!("result backend {}", mask_url(&config.result_backend)))
}

/// `om-worker worker`: runs until SIGTERM/SIGINT (warm), a second one (cold).
///
/// This function owns everything the worker uses and stops it in the order
/// [`crate::shutdown`] describes: the worker drains, `worker-offline` goes
/// out, the background services stop, the broker is closed (returning
/// unstarted messages), the kernels are ended.
pub async fn run_worker(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let broker = connect_broker(&config).await?;
    let backend = connect_backend(&config, Arc::clone(&broker)).await?;
    if crate::tls::mongo_uses_tls(&config.mongo_client_url()) {
        probe_mongo_tls(&config.mongo_client_url(), &config.mongo_url, &config).await?;
    }
    if config.result_backend.starts_with("mongodb") {
        let url = crate::tls::mongo_client_url(
            &config.result_backend,
            config.use_ssl,
            config.ca_certs_path.as_deref(),
        );
        if crate::tls::mongo_uses_tls(&url) {
            probe_mongo_tls(&url, &config.result_backend, &config).await?;
        }
    }
    // Kernel runtime dirs left by a worker that was SIGKILLed.
    let swept = crate::kernel::launcher::sweep_stale_runtime_dirs(Duration::from_secs(3600));
    if swept > 0 {
        info!("removed {swept} stale kernel runtime dir(s)");
    }
    let mut registry = Registry::builtin();
    let (notebook, notebook_runtime) = kernels::notebook_task(&config).await?;
    registry.register(Arc::new(notebook));
    // Scheduled notebooks: their own (cheap) MongoDB pool, the shared broker.
    let schedule_store = Store::connect(&config.mongo_client_url(), Duration::from_secs(5))
        .await
        .with_context(|| format!("MongoDB {}", mask_url(&config.mongo_url)))?;
    let default_queue = config.queues.first().cloned().unwrap_or_default();
    registry.register(Arc::new(ScheduleOmegamlJob::new(schedule_store.clone())));
    registry.register(Arc::new(ExecuteScripts::new(
        schedule_store,
        Arc::clone(&broker),
        default_queue.clone(),
    )));
    // Every other task omega|ml registers runs in a forked Python child.
    // Listed on the first name om-worker does not run itself, in a child
    // forked from the fork server (tens of milliseconds once it is up).
    let python_tasks = notebook_runtime.python_tasks(&config, &registry.names());
    // The fork server starts now, in the background (the worker consumes at
    // once; a task that arrives before the server is up waits for it): the
    // first notebook or Python task then does not pay its imports (seconds),
    // and listing the Python tasks here makes `inspect registered` show them.
    // `--lazy-fork-server` leaves it to the first task that needs it.
    if (config.fork_server && !config.lazy_fork_server) || config.kernel_pool > 0 {
        let warm = Arc::clone(&python_tasks);
        tokio::spawn(async move { warm.preload().await });
    }
    let native: Vec<String> = registry.names().iter().map(|n| n.to_string()).collect();
    let listed = Arc::clone(&python_tasks);
    let registered: crate::control::commands::Registered = Arc::new(move || {
        let mut names = native.clone();
        names.extend(
            listed
                .listed()
                .into_iter()
                .filter(|n| !n.starts_with("celery.")),
        );
        names.sort();
        names.dedup();
        names
    });
    let registry = registry.with_fallback(python_tasks);
    info!("registered tasks: {}", registry.names().join(", "));
    let shutdown = Shutdown::new();
    shutdown
        .listen_for_signals()
        .context("installing SIGTERM/SIGINT handlers")?;
    let mut services = Services::new();
    // Remote control (pidbox), events (heartbeats; task events with -E), metrics.
    let state = Arc::new(WorkerState::from_config(&config));
    state.set_task_events(config.task_events);
    state.set_shutdown(shutdown.warm_token());
    let events = crate::control::start(
        Arc::clone(&broker),
        Arc::clone(&state),
        registered,
        config.metrics_addr,
        config.heartbeat_interval,
        services.token(),
    )
    .await?;
    services.adopt("events", events);
    // --beat: omega|ml's `celery beat` (execute_scripts every 60 s).
    if config.beat {
        services.spawn(
            "beat",
            run_beat(
                Arc::clone(&broker),
                default_queue,
                Duration::from_secs(config.beat_interval),
                services.token(),
            ),
        );
    }
    // Crash safety for notebook tasks: the in-flight ledger and its sweeper.
    let ledger_store = Store::connect(&config.mongo_client_url(), Duration::from_secs(5))
        .await
        .with_context(|| format!("MongoDB {}", mask_url(&config.mongo_url)))?;
    let lease = Duration::from_secs(config.lease_seconds);
    let ledger = MongoLedger::new(ledger_store.database(), &config.nodename, lease);
    services.spawn(
        "ledger sweeper",
        crate::ledger::sweep_forever(
            ledger.clone(),
            Arc::clone(&broker),
            (lease / 2).max(Duration::from_secs(1)),
            services.token(),
        ),
    );
    let result = Worker::new(Arc::clone(&config), Arc::clone(&broker), backend, registry)
        .with_state(Arc::clone(&state))
        .with_ledger(Arc::new(ledger))
        .run(&shutdown)
        .await;
    // worker-offline while the broker is still open, then what publishes through it.
    state.before_close().await;
    services.stop(Duration::from_secs(10)).await;
    // Last user of the broker gone: closing returns unstarted messages to their queues.
    if let Err(e) = broker.close().await {
        warn!("closing broker connection: {e}");
    }
    // Stop pool refills and the fork server, then end every kernel left.
    notebook_runtime.shutdown().await;
    info!("om-worker {} stopped", config.nodename);
    result?;
    Ok(())
}

/// `om-worker check`: every dependency, each with a precise verdict.
/// Returns the number of failed checks.
pub async fn run_check(config: &Config) -> usize {
    let mut failed = 0;
    let mut report = |what: &str, r: anyhow::Result<String>| match r {
        Ok(detail) => println!("ok      {what}: {detail}"),
        Err(e) => {
            failed += 1;
            println!("FAILED  {what}: {e:#}");
        }
    };
    const LIMIT: Duration = Duration::from_secs(10);

    // A timeout names what did not answer, like every other verdict.
    let no_answer = |url: &str| anyhow::anyhow!("{}: no answer within {LIMIT:?}", mask_url(url));
    let broker = tokio::time::timeout(LIMIT, connect_broker(config))
        .await
        .unwrap_or_else(|_| Err(no_answer(&config.broker_url)));
    let broker_ok = broker
        .as_ref()
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("{e:#}"));
    report(
        "broker",
        broker_ok.map(|_| format!("connected to {}", mask_url(&config.broker_url))),
    );

    let mongo = tokio::time::timeout(LIMIT, ping_mongo(&config.mongo_client_url()))
        .await
        .unwrap_or_else(|_| Err(no_answer(&config.mongo_url)));
    report(
        "mongodb",
        mongo.map(|_| format!("ping ok at {}", mask_url(&config.mongo_url))),
    );

    let backend = match &broker {
        Ok(b) => {
            let r = tokio::time::timeout(LIMIT, async {
                let backend = connect_backend(config, Arc::clone(b)).await?;
                backend.ping().await?;
                Ok::<_, anyhow::Error>(backend.name())
            })
            .await
            .unwrap_or_else(|_| Err(no_answer(&config.result_backend)));
            r.map(|name| format!("{name} at {}", mask_url(&config.result_backend)))
        }
        Err(_) if config.result_backend.starts_with("rpc") => Err(anyhow::anyhow!(
            "rpc:// needs the broker, which is unreachable"
        )),
        Err(_) => Err(anyhow::anyhow!("not checked: broker unreachable")),
    };
    report("result backend", backend);

    report("kernel python", check_python(&config.python).await);
    if let Ok(b) = broker {
        let _ = b.close().await;
    }
    failed
}

/// MongoDB is connected lazily and an outage at start is retried like any
/// other, but a certificate the worker does not trust (or a server that does
/// not speak TLS) is a configuration error that retrying never fixes: one
/// ping at start, and a TLS failure ends start-up with a line that says what
/// to fix. Any other failure is logged and left to the usual retries.
async fn probe_mongo_tls(client_url: &str, url: &str, config: &Config) -> anyhow::Result<()> {
    const LIMIT: Duration = Duration::from_secs(15);
    let failure = match tokio::time::timeout(LIMIT, ping_mongo(client_url)).await {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => format!("{e:#}"),
        Err(_) => format!("no answer within {LIMIT:?}"),
    };
    let trust = config
        .ca_certs_path
        .as_ref()
        .map(|ca| format!("CA file {} (CA_CERTS_PATH)", ca.display()));
    let service = format!("MongoDB {}", mask_url(url));
    if let Some(line) = crate::tls::explain(&service, trust.as_deref(), &failure) {
        bail!(line);
    }
    warn!(url = %mask_url(url), error = %failure,
        "MongoDB not reachable at start; its operations are retried");
    Ok(())
}

async fn ping_mongo(url: &str) -> anyhow::Result<()> {
    use mongodb::bson::doc;
    let mut opts = mongodb::options::ClientOptions::parse(url)
        .await
        .context("invalid MongoDB URL")?;
    // As Store::connect and omega|ml (`directConnection=True`): the host in the URL, not the
    // members a replica set advertises (whose names its certificate may not list).
    if opts.hosts.len() == 1 && opts.direct_connection.is_none() {
        opts.direct_connection = Some(true);
    }
    opts.server_selection_timeout = Some(Duration::from_secs(5));
    opts.connect_timeout = Some(Duration::from_secs(5));
    let client = mongodb::Client::with_options(opts)?;
    client
        .database("admin")
        .run_command(doc! {"ping": 1})
        .await
        .context("ping")?;
    Ok(())
}

async fn check_python(python: &str) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(python)
        .args([
            "-c",
            "import sys, ipykernel; print(sys.executable, sys.version.split()[0], 'ipykernel', ipykernel.__version__)",
        ])
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot run {python:?}"))?;
    if !out.status.success() {
        bail!(
            "{python:?} cannot import ipykernel: {}",
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
