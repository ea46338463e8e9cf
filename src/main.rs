//! `om-worker`: flags → [`Config`] → the library does the work.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use om_worker::cli::{Cli, Command, LogFormat, WorkerFlags};
use om_worker::config::{Config, FileConfig};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("om-worker: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(
    config_path: Option<&std::path::Path>,
    flags: &WorkerFlags,
) -> anyhow::Result<Config> {
    let path = config_path
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("OM_WORKER_CONFIG").map(Into::into));
    let file = match &path {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    Ok(Config::resolve(
        flags,
        &|k| std::env::var(k).ok(),
        &file,
        &host,
    )?)
}

/// The library's log setup ([`om_worker::logging`]): values from messages are
/// escaped and bounded in human logs.
fn init_logging(level: &str, format: LogFormat) {
    om_worker::logging::init(
        level,
        match format {
            LogFormat::Human => om_worker::logging::Format::Human,
            LogFormat::Json => om_worker::logging::Format::Json,
        },
    );
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Worker(flags) => {
            let config = load_config(cli.config.as_deref(), &flags)?;
            init_logging(&config.loglevel, config.log_format);
            let result = rt.block_on(om_worker::app::run_worker(config));
            // Everything is settled and every kernel is gone: leave without
            // dropping the runtime. Dropping it cancels the MongoDB driver's
            // pool workers while pooled clients still hold requesters, which
            // makes the driver panic in its teardown (mongodb 3.9,
            // cmap/connection_requester.rs) after a clean shutdown.
            let code = match result {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("om-worker: error: {e:#}");
                    1
                }
            };
            std::process::exit(code)
        }
        Command::Config(flags) => {
            let config = load_config(cli.config.as_deref(), &flags)?;
            print!("{}", config.render_masked());
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(flags) => {
            let config = load_config(cli.config.as_deref(), &flags)?;
            init_logging("error", LogFormat::Human);
            let failed = rt.block_on(om_worker::app::run_check(&config));
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::RunNotebook(flags) => {
            init_logging("warn", LogFormat::Human);
            rt.block_on(om_worker::notebook::run_cli::run_notebook_command(
                om_worker::notebook::run_cli::RunNotebookArgs {
                    input: flags.input,
                    output: flags.output,
                    timeout: flags.timeout,
                    cell_timeout: flags.cell_timeout,
                    python: flags.python,
                    kernel_name: flags.kernel_name,
                },
            ))
        }
    }
}
