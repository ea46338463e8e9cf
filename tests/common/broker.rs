//! Helpers for the broker integration tests (real RabbitMQ and Redis, no mocks).
#![allow(dead_code)]

use std::process::Command;
use std::time::Duration;

use om_worker::broker::Delivery;
use tokio::sync::mpsc;

/// AMQP URL of the local RabbitMQ (kombu style, vhost `/`).
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672//";
/// Redis URL (db 0, as the worker uses; tests only touch unique keys).
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/0";

/// A name no other test (or person) uses: `omw-test-<uuid>`.
pub fn unique(tag: &str) -> String {
    format!("omw-test-{tag}-{}", uuid::Uuid::new_v4().simple())
}

/// Runs Python code in the project venv (celery 5.7 / kombu 5.7); returns
/// stdout, panicking with stderr when it fails.
pub fn python(code: &str) -> String {
    let py = format!("{}/.venv/bin/python", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(py)
        .arg("-c")
        .arg(code)
        .output()
        .expect("venv python runs");
    assert!(
        out.status.success(),
        "python failed:\n{}\n--- stderr ---\n{}",
        code,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns its stdout.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} runs: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The next delivery within `wait`, or `None`.
pub async fn recv(rx: &mut mpsc::Receiver<Delivery>, wait: Duration) -> Option<Delivery> {
    tokio::time::timeout(wait, rx.recv()).await.ok().flatten()
}

/// Runs a test body with an overall time bound.
pub async fn bounded<F: std::future::Future<Output = ()>>(secs: u64, f: F) {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test finished in time");
}

/// Shows the crate's logs in failing tests (`RUST_LOG` overrides).
pub fn init_logs() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "om_worker=debug".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
