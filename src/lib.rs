//! om-worker: a drop-in Rust worker for omega|ml's Celery queues.
//!
//! Data flow (see the README's architecture section):
//! [`broker`] → [`worker`] (decode with [`protocol`], decide, run [`tasks`]) →
//! [`protocol::result_codec`] → [`backend`], with notebooks run by [`kernel`]
//! on the [`notebook`] model and stored by [`store`]; [`app`] owns and wires
//! everything and stops it through [`shutdown`].

pub mod app;
pub mod backend;
pub mod backoff;
pub mod broker;
pub mod cli;
pub mod config;
pub mod control;
pub mod gate;
pub mod kernel;
pub mod ledger;
pub mod logging;
pub mod notebook;
pub mod protocol;
pub mod redact;
pub mod schedule;
pub mod shutdown;
pub mod store;
pub mod tasks;
pub mod telemetry;
pub mod tls;
pub mod worker;
