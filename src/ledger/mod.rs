//! The in-flight ledger: no task lost when a worker dies mid-run.
//!
//! omega|ml's Python worker acks a task when it starts, so a crash loses the
//! running notebook. Holding the message unacked instead (acks-late) breaks
//! long notebooks: RabbitMQ closes a channel that keeps a delivery unacked past
//! `consumer_timeout` (30 min) and kombu's Redis transport hands a message
//! unacked for `visibility_timeout` (1 h) to another worker while the first
//! still runs it. So om-worker acks early *after* writing a durable record of
//! the message with a lease the running worker renews. Every worker sweeps
//! the ledger; an expired lease means its owner died, and the sweeper claims
//! the record atomically and republishes the original message to its queue.
//! Tasks are idempotent on top of that (`run_omegaml_job` does not run a task
//! again whose run is already recorded), so a republish after a crash at the
//! very end of a run stores no second result.
//!
//! Guarantee: a task whose record was written is run to completion by some
//! worker as long as one is alive, at least once, and its result is recorded
//! once. The record is removed when the result is stored.
//!
//! The worker sees only the small [`Ledger`] trait; [`MongoLedger`] keeps the
//! records in MongoDB (collection [`COLLECTION`] of the omega database) and
//! runs the sweep, [`memory::MemoryLedger`] lets the worker's decisions be
//! tested without a database.

pub mod memory;
mod mongo;

use std::time::Duration;

use async_trait::async_trait;

use crate::protocol::RawMessage;

pub use mongo::{sweep_forever, MongoLedger, COLLECTION};

/// Errors from the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// MongoDB refused or did not answer.
    #[error("in-flight ledger {op}: {source}")]
    Mongo {
        /// What was being done.
        op: &'static str,
        /// The driver's error.
        #[source]
        source: mongodb::error::Error,
    },
    /// The ledger cannot be reached (other stores than MongoDB).
    #[error("in-flight ledger {op}: {reason}")]
    Unavailable {
        /// What was being done.
        op: &'static str,
        /// Why it failed.
        reason: String,
    },
}

/// What [`Ledger::begin`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// The record is ours now: run the task.
    Run,
    /// Another live worker holds this task: this delivery is a duplicate.
    HeldBy(String),
}

/// The records of the durable tasks one worker runs.
#[async_trait]
pub trait Ledger: Send + Sync {
    /// Records that this worker starts `task_id` (from `raw`), unless another
    /// worker holds a live lease on it. Called before the message is acked.
    async fn begin(&self, task_id: &str, raw: &RawMessage) -> Result<Begin, LedgerError>;

    /// Extends the lease of a task this worker runs; `false` when the record
    /// is no longer ours (claimed by another worker after a long outage).
    async fn renew(&self, task_id: &str) -> Result<bool, LedgerError>;

    /// The task's result is stored: forget it.
    async fn finish(&self, task_id: &str) -> Result<(), LedgerError>;

    /// How long a record stays ours without a renewal.
    fn lease(&self) -> Duration;
}
