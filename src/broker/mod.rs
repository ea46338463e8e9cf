//! Message brokers: where task messages come from and where replies go.
//!
//! One small trait, [`Broker`], with two implementations that speak exactly
//! what kombu speaks: [`amqp`] (RabbitMQ via lapin) and [`redis`] (kombu's
//! Redis transport: priority lists, `unacked` ack emulation, visibility
//! restore). The worker sees only [`Delivery`] values and [`Acker`] handles;
//! decoding the body is the job of [`crate::protocol`]. [`from_url`] picks
//! and connects the implementation a broker URL names.

pub mod amqp;

/// Largest message body (AMQP) or Redis list element om-worker decodes.
/// Decoding costs several times a message's size (base64, pickle, the
/// task's result), so one huge message could take the worker's memory with
/// it. A larger one is not decoded: it is answered with a FAILURE
/// (`DecodeError`) when its task id can be read, and rejected without requeue.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The transport error of a message over [`MAX_MESSAGE_BYTES`].
pub fn too_large(len: usize) -> String {
    format!("message of {len} bytes is over the {MAX_MESSAGE_BYTES}-byte limit; not decoded")
}
pub mod memory;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::protocol::{Outgoing, RawMessage};
use crate::redact::mask_url;

/// An exchange type, for the few exchanges the worker declares itself
/// (`celeryev`, `reply.celery.pidbox`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeType {
    /// Routes by exact routing key.
    Direct,
    /// Routes by `*`/`#` patterns.
    Topic,
    /// Copies to every bound queue.
    Fanout,
}

/// A broadcast subscription (remote control, `celery.pidbox`).
///
/// On AMQP this is a queue of our own bound to a fanout exchange; on Redis
/// it is `PSUBSCRIBE /<db>.<exchange>` on a dedicated pub/sub connection
/// (kombu's fanout emulation), and `queue` only names the binding member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FanoutSubscription {
    /// The fanout exchange, e.g. `celery.pidbox` (declared non-durable, as kombu does).
    pub exchange: String,
    /// Our queue, e.g. `<nodename>.celery.pidbox`.
    pub queue: String,
    /// Queue `x-expires` in ms (celery `control_queue_expires`, 10 s).
    pub expires_ms: Option<u32>,
    /// Queue `x-message-ttl` in ms (celery `control_queue_ttl`, 300 s).
    pub message_ttl_ms: Option<u32>,
    /// Exclusive queue (celery >= 5.7: a duplicate nodename gets `405 RESOURCE_LOCKED`).
    pub exclusive: bool,
}

impl FanoutSubscription {
    /// Celery 5.7's pidbox queue for `nodename`: `<nodename>.celery.pidbox`,
    /// non-durable, auto-delete, exclusive, `x-expires` 10 s, `x-message-ttl` 300 s.
    pub fn pidbox(nodename: &str) -> Self {
        FanoutSubscription {
            exchange: "celery.pidbox".to_owned(),
            queue: format!("{nodename}.celery.pidbox"),
            expires_ms: Some(10_000),
            message_ttl_ms: Some(300_000),
            exclusive: true,
        }
    }
}

/// Errors from a broker connection.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker URL cannot be used.
    #[error("invalid broker URL: {0}")]
    InvalidUrl(String),
    /// Could not connect (or lost the connection).
    #[error("broker connection failed: {0}")]
    Connection(String),
    /// A declaration, publish, ack or other broker operation failed.
    #[error("broker operation failed: {0}")]
    Operation(String),
    /// The message can never be published on this broker, however often it
    /// is tried (e.g. a property over AMQP's 255-byte short-string limit).
    #[error("cannot be published: {0}")]
    Unpublishable(String),
    /// [`from_url`] was given a scheme no broker here speaks; holds the
    /// masked URL.
    #[error("unsupported broker URL {0} (expected amqp://, amqps:// or redis://)")]
    UnsupportedScheme(String),
    /// [`from_url`] could not connect to the broker at `url` (masked);
    /// `source` says why.
    #[error("broker {url}")]
    AtUrl {
        /// The broker URL, password masked.
        url: String,
        /// What went wrong.
        #[source]
        source: Box<BrokerError>,
    },
}

/// Per-transport options for [`from_url`]; only those of the transport the
/// URL names are used.
#[derive(Debug, Clone, Default)]
pub struct BrokerOptions {
    /// For `amqp://`, `amqps://` and `pyamqp://` URLs.
    pub amqp: amqp::AmqpOptions,
    /// For `redis://` and `rediss://` URLs.
    pub redis: redis::RedisOptions,
    /// `OMEGA_USESSL` and the worker-wide CA; with the URL's kombu `ssl_*`
    /// parameters they decide the connection's TLS ([`crate::tls::for_url`]).
    pub tls: crate::tls::WorkerTls,
}

/// Connects to the broker `url` names, as [`crate::backend::from_url`] does
/// for result backends: `amqp://`, `amqps://` and kombu's `pyamqp://` (read
/// as `amqp://`) go to [`amqp::AmqpBroker`], `redis://` and `rediss://` to
/// [`redis::RedisBroker`].
///
/// A connection error comes back as [`BrokerError::AtUrl`], naming the
/// (masked) URL, so a caller can report it as is.
pub async fn from_url(
    url: &str,
    mut options: BrokerOptions,
) -> Result<Arc<dyn Broker>, BrokerError> {
    let at = |url: &str| {
        let url = mask_url(url);
        move |e| BrokerError::AtUrl {
            url,
            source: Box::new(e),
        }
    };
    let (driver_url, tls) = crate::tls::for_url(url, &options.tls)
        .map_err(|e| at(url)(BrokerError::InvalidUrl(e.to_string())))?;
    let scheme = driver_url.split_once("://").map(|(s, _)| s).unwrap_or("");
    match scheme {
        "amqp" | "amqps" | "pyamqp" | "pyamqps" => {
            let url = driver_url.replacen("pyamqp://", "amqp://", 1);
            options.amqp.tls = tls.or(options.amqp.tls);
            let broker = amqp::AmqpBroker::connect(&url, options.amqp)
                .await
                .map_err(at(&url))?;
            Ok(Arc::new(broker))
        }
        "redis" | "rediss" => {
            options.redis.tls = tls.or(options.redis.tls);
            let broker = redis::RedisBroker::connect(&driver_url, options.redis)
                .await
                .map_err(at(&driver_url))?;
            Ok(Arc::new(broker))
        }
        _ => Err(BrokerError::UnsupportedScheme(mask_url(url))),
    }
}

/// How a consumer acknowledges one delivery. Exactly one of these is called.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Done with the message: remove it for good.
    async fn ack(&self) -> Result<(), BrokerError>;
    /// Give the message up: back onto its queue (`requeue`) or to the
    /// dead-letter exchange / deleted (`!requeue`).
    async fn reject(&self, requeue: bool) -> Result<(), BrokerError>;
    /// The message will wait for its ETA instead of running: stop counting it
    /// against the prefetch limit, so held messages (a far-future countdown,
    /// many at once) never starve the worker — Celery's
    /// `qos.increment_eventually()`.
    async fn hold_outside_prefetch(&self) {}
    /// The ETA is over (or the hold ended otherwise): count the message again
    /// where the broker can (Celery's `qos.decrement_eventually()`).
    async fn end_hold(&self) {}
}

/// One message handed to the worker, with the handle to settle it.
pub struct Delivery {
    /// The message.
    pub message: RawMessage,
    /// Settles it on the broker.
    pub acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}

/// A broker connection, shared by the consumer loop and every publisher.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Declares what kombu declares for each queue and starts consuming them.
    /// Deliveries arrive on the returned channel, at most `prefetch` unsettled
    /// at a time (0 = unlimited). The broker reconnects on its own; the channel
    /// closes only after [`Broker::stop_consuming`] or on a fatal error.
    async fn consume(
        &self,
        queues: &[String],
        prefetch: u16,
    ) -> Result<mpsc::Receiver<Delivery>, BrokerError>;

    /// Stops taking new messages (warm shutdown). Unsettled deliveries stay
    /// valid until the connection is closed.
    async fn stop_consuming(&self) -> Result<(), BrokerError>;

    /// Changes the prefetch limit of the running consumer (remote control
    /// `pool_grow` / `pool_shrink`: concurrency × prefetch multiplier, as
    /// Celery's `_update_prefetch_count`). Deliveries already handed over
    /// stay valid; a lower limit only holds back the next ones. A consumer
    /// started unlimited (0) stays unlimited, and so does a request for 0.
    async fn set_prefetch(&self, prefetch: u16) -> Result<(), BrokerError> {
        Err(BrokerError::Operation(format!(
            "changing the prefetch to {prefetch} at runtime is not supported by this broker"
        )))
    }

    /// Publishes to `exchange` with `routing_key`. The default exchange `""`
    /// routes to the queue named by `routing_key` (rpc:// replies, forwarding).
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Outgoing,
    ) -> Result<(), BrokerError>;

    /// Declares `name` as kombu does before a publish (AMQP: direct durable
    /// exchange, durable queue, binding; Redis: the binding set). On AMQP a
    /// publish to the default exchange for an undeclared queue is dropped
    /// silently, so a worker that *sends* tasks must declare first.
    async fn declare_queue(&self, name: &str) -> Result<(), BrokerError>;

    /// Closes the connection; on RabbitMQ unacked deliveries go back to their
    /// queues, on Redis they are restored from `unacked` at once.
    async fn close(&self) -> Result<(), BrokerError>;

    /// Subscribes to a broadcast exchange (remote control). Messages are
    /// consumed without acks (`no_ack`, as kombu's pidbox does) and arrive on
    /// the returned channel; the subscription re-establishes itself after a
    /// reconnect and ends when the broker is closed. Brokers without
    /// broadcast support say so.
    async fn subscribe_fanout(
        &self,
        subscription: FanoutSubscription,
    ) -> Result<mpsc::Receiver<RawMessage>, BrokerError> {
        Err(BrokerError::Operation(format!(
            "broadcast subscriptions are not supported by this broker ({})",
            subscription.exchange
        )))
    }

    /// Declares an exchange the worker publishes to (AMQP needs it to exist
    /// before a publish, or the channel is closed with 404). A no-op where
    /// exchanges are implicit (Redis).
    async fn declare_exchange(
        &self,
        _name: &str,
        _kind: ExchangeType,
        _durable: bool,
    ) -> Result<(), BrokerError> {
        Ok(())
    }

    /// Messages ready in `queue` (deliveries held by consumers not counted), as
    /// celery-exporter reads it for `celery_queue_length`: AMQP `queue.declare(passive)`'s
    /// `message_count`, Redis `LLEN`. `None` when the queue does not exist or the broker
    /// cannot tell.
    async fn queue_length(&self, _queue: &str) -> Result<Option<u64>, BrokerError> {
        Ok(None)
    }

    /// Starts consuming one more queue while running (`add_consumer`),
    /// declaring it as kombu does. Consuming it already is not an error.
    async fn add_queue(&self, queue: &str) -> Result<(), BrokerError> {
        Err(BrokerError::Operation(format!(
            "adding queue {queue:?} at runtime is not supported by this broker"
        )))
    }

    /// Stops consuming a queue while running (`cancel_consumer`). Deliveries
    /// already handed over stay valid.
    async fn cancel_queue(&self, queue: &str) -> Result<(), BrokerError> {
        Err(BrokerError::Operation(format!(
            "cancelling queue {queue:?} at runtime is not supported by this broker"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::{from_url, BrokerOptions};

    /// The text `om-worker` prints (`{:#}` of the anyhow error) must stay
    /// what `app::connect_broker` printed before `from_url` existed.
    async fn printed(url: &str) -> String {
        match from_url(url, BrokerOptions::default()).await {
            Ok(_) => panic!("{url} connected"),
            Err(e) => format!("{:#}", anyhow::Error::from(e)),
        }
    }

    #[tokio::test]
    async fn unsupported_scheme_text_is_unchanged() {
        assert_eq!(
            printed("http://u:secret@h/").await,
            "unsupported broker URL http://u:***@h/ (expected amqp://, amqps:// or redis://)"
        );
    }

    #[tokio::test]
    async fn connection_errors_name_the_masked_url() {
        // Port 1 refuses at once; pyamqp:// is reported as the amqp:// it is.
        let text = printed("pyamqp://u:secret@127.0.0.1:1//").await;
        assert!(
            text.starts_with("broker amqp://u:***@127.0.0.1:1//: broker connection failed: "),
            "{text}"
        );
        let text = printed("redis://:secret@127.0.0.1:1/0").await;
        assert!(
            text.starts_with("broker redis://:***@127.0.0.1:1/0: broker connection failed: "),
            "{text}"
        );
    }
}
