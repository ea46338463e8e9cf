//! [`AmqpOptions`]: the knobs of an AMQP connection that kombu takes from
//! the Celery configuration (QoS flavour, heartbeat) plus the worker's own
//! (timeouts, reconnect cap, connection name). Kept apart so a reader finds
//! every tunable — and its default — in one place.

use std::time::Duration;

/// Options for [`super::AmqpBroker::connect`].
#[derive(Debug, Clone)]
pub struct AmqpOptions {
    /// `global` flag of `basic.qos`: `true` = channel-wide prefetch, as kombu
    /// sends for RabbitMQ 3.3–3.x; set `false` for RabbitMQ ≥ 4 or quorum
    /// queues (which refuse global QoS).
    pub global_qos: bool,
    /// Heartbeat to request in seconds; `None` accepts the server's proposal,
    /// `Some(0)` disables heartbeats (omega|ml sets `broker_heartbeat=0`).
    pub heartbeat: Option<u16>,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// Upper bound of the reconnect backoff, so a broker restart is picked up
    /// within seconds.
    pub max_backoff: Duration,
    /// `connection_name` client property shown in the management UI.
    pub connection_name: Option<String>,
    /// TLS (`amqps://`): what to trust and present (see [`crate::tls`]).
    /// `None` with an `amqps://` URL trusts the system roots.
    pub tls: Option<crate::tls::TlsSettings>,
}

impl Default for AmqpOptions {
    fn default() -> Self {
        Self {
            global_qos: true,
            heartbeat: None,
            connect_timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(2),
            connection_name: None,
            tls: None,
        }
    }
}
