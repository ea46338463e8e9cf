//! [`RedisOptions`]: kombu's `broker_transport_options` for the Redis
//! transport plus the worker's own reconnect cap and client name.
//!
//! Key names, separators and priority steps are a contract with every Python
//! client and worker on the same Redis, so their defaults are kombu's and
//! live here, in one place.

use std::time::Duration;

/// Options for [`super::RedisBroker::connect`]; the names and defaults are kombu's
/// `broker_transport_options`, which must match the clients'.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Unacked messages older than this are restored by the sweep (kombu
    /// `visibility_timeout`, 3600 s).
    pub visibility_timeout: Duration,
    /// How often the restore sweep runs (kombu: about every 100 s). Zero
    /// disables the sweep (when other workers are trusted to run it).
    pub restore_interval: Duration,
    /// Priority buckets (kombu `priority_steps`, `[0, 3, 6, 9]`).
    pub priority_steps: Vec<u8>,
    /// Separator between queue name and step, and in binding members
    /// (kombu `sep`, `"\x06\x16"`).
    pub sep: String,
    /// Prepended verbatim to every key and pub/sub channel (kombu
    /// `global_keyprefix`, empty by default).
    pub global_keyprefix: String,
    /// kombu `unacked_key`.
    pub unacked_key: String,
    /// kombu `unacked_index_key`.
    pub unacked_index_key: String,
    /// kombu `unacked_mutex_key`.
    pub unacked_mutex_key: String,
    /// kombu `unacked_mutex_expire` (300 s).
    pub unacked_mutex_expire: Duration,
    /// `BRPOP` timeout (kombu `brpop_timeout`, 1 s; whole seconds are sent).
    pub brpop_timeout: Duration,
    /// Fanout pub/sub prefix; `None` = kombu's `"/{db}."`.
    pub fanout_prefix: Option<String>,
    /// Exchanges published with `PUBLISH` instead of list pushes. kombu knows
    /// exchange types from in-process declarations; a worker only ever
    /// publishes to these fanout ones (events, remote control).
    pub fanout_exchanges: Vec<String>,
    /// Most tags restored per sweep.
    pub restore_batch: usize,
    /// Upper bound of the reconnect backoff.
    pub max_backoff: Duration,
    /// `CLIENT SETNAME` for every connection, so operators (and tests) can
    /// tell the worker's connections apart in `CLIENT LIST`.
    pub client_name: Option<String>,
    /// How long this process's holder lease lasts (om-worker's own, not
    /// kombu's): messages it holds unstarted are restored by another worker
    /// about this long after it died (see `holder.rs`). `None` leaves them
    /// to the visibility timeout, as kombu does.
    pub holder_lease: Option<Duration>,
    /// TLS (`rediss://`): what to trust and present (see [`crate::tls`]).
    /// `None` with a `rediss://` URL trusts the system roots.
    pub tls: Option<crate::tls::TlsSettings>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            visibility_timeout: Duration::from_secs(3600),
            restore_interval: Duration::from_secs(60),
            priority_steps: vec![0, 3, 6, 9],
            sep: "\x06\x16".to_owned(),
            global_keyprefix: String::new(),
            unacked_key: "unacked".to_owned(),
            unacked_index_key: "unacked_index".to_owned(),
            unacked_mutex_key: "unacked_mutex".to_owned(),
            unacked_mutex_expire: Duration::from_secs(300),
            brpop_timeout: Duration::from_secs(1),
            fanout_prefix: None,
            fanout_exchanges: vec!["celery.pidbox".to_owned(), "celeryev".to_owned()],
            restore_batch: 1000,
            max_backoff: Duration::from_secs(2),
            client_name: None,
            holder_lease: Some(Duration::from_secs(60)),
            tls: None,
        }
    }
}
