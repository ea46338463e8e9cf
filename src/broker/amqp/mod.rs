//! RabbitMQ (AMQP 0-9-1) broker via lapin, declaring exactly what kombu declares.
//!
//! * **Topology.** For each queue label `L`: exchange `L` (direct, durable,
//!   !auto_delete), queue `L` (durable, !exclusive, !auto_delete, no
//!   arguments) and a binding `L → L` with key `L` — the same entities a
//!   Celery client declares before publishing, so whichever side declares
//!   first the other never gets `406 PRECONDITION_FAILED`.
//! * **QoS.** `basic.qos(prefetch_count, global)`. kombu sends `global=true`
//!   on RabbitMQ 3.3–3.x (channel-wide limit, `qos_semantics_matches_spec`)
//!   and `false` on RabbitMQ ≥ 4 and with quorum queues. lapin does not
//!   expose the server version, so [`AmqpOptions::global_qos`] carries the
//!   choice (default `true`, matching the RabbitMQ 3.10 deployment); lapin
//!   sends the flag verbatim in `basic.qos` (prefetch_size is always 0).
//! * **Acks.** Manual (`no_ack=false`), `basic.ack` / `basic.reject`, never
//!   `multiple`.
//! * **Reconnect.** A supervisor task watches the connection and its
//!   channels; when one dies it reconnects with exponential backoff (100 ms
//!   doubling, capped by [`AmqpOptions::max_backoff`], 2 s by default),
//!   re-declares, and resumes consuming onto the *same* mpsc sender. Acks for
//!   deliveries of a dead connection return an error: RabbitMQ has already
//!   requeued them.
//!
//! One job per file:
//!
//! | file | owns |
//! |---|---|
//! | `options.rs` | [`AmqpOptions`] and their defaults |
//! | `url.rs` | kombu's URL rules → lapin's `AMQPUri` |
//! | `session.rs` | the live connection, the reconnect supervisor, generations |
//! | `topology.rs` | kombu-identical exchange/queue/binding declarations |
//! | `consume.rs` | consumers, QoS and ETA holds, runtime add/cancel of queues |
//! | `acker.rs` | `basic.ack` / `basic.reject` of one delivery |
//! | `publish.rs` | `basic.publish` with one retry across a reconnect |
//! | (here) | `queue_length`: a passive `queue.declare` for metrics |
//! | `fanout.rs` | broadcast (pidbox) subscriptions that survive reconnects |
//! | `properties.rs` | AMQP basic properties ↔ [`RawMessage`] / [`Outgoing`] |
//! | `fields.rs` | the field-table codec (headers ↔ [`crate::protocol::Value`]) |

mod acker;
mod consume;
mod fanout;
mod fields;
mod options;
mod properties;
mod publish;
mod session;
mod topology;
mod url;

use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::types::ShortString;
use lapin::uri::AMQPUri;
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{Broker, BrokerError, Delivery, ExchangeType, FanoutSubscription};
use crate::protocol::{Outgoing, RawMessage};
use crate::redact::mask_url;
use consume::ConsumeSpec;
use session::{shutdown_session, supervise, Session};

pub use fields::{amqp_to_value, headers_to_table, table_to_headers, value_to_amqp};
pub use options::AmqpOptions;

/// A RabbitMQ connection speaking kombu's topology (see the module docs).
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

/// State shared by the broker handle, the supervisor, the consumers, the
/// ackers and the broadcast subscriptions; each submodule adds the methods of
/// its own job.
struct Inner {
    uri: AMQPUri,
    masked_url: String,
    /// The TLS client configuration of an `amqps://` URL, built once at
    /// connect (so an unreadable CA file fails start-up), and what it trusts
    /// (for error messages).
    tls: Option<(Arc<rustls::ClientConfig>, String)>,
    options: AmqpOptions,
    /// The live session, replaced by the supervisor after a reconnect.
    session: Mutex<Option<Arc<Session>>>,
    /// Generation of the live session; 0 while disconnected. Ackers compare
    /// against it so a delivery of a dead connection is never acked on a new one.
    live_generation: AtomicU64,
    next_generation: AtomicU64,
    /// What `consume` asked for, replayed after each reconnect.
    spec: Mutex<Option<ConsumeSpec>>,
    /// Deliveries held for their ETA, added to the prefetch (see
    /// [`crate::broker::Acker::hold_outside_prefetch`]).
    held: AtomicU32,
    shutdown: CancellationToken,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

impl AmqpBroker {
    /// Connects to `url` (`amqp://` / `amqps://`, kombu's URL rules: the path
    /// after the first `/` is the vhost, so `//` and an empty path both mean
    /// vhost `/`) and starts the reconnect supervisor.
    ///
    /// The first connection attempt is made here and its failure is returned,
    /// so a wrong URL or password is reported at startup instead of retried
    /// forever.
    pub async fn connect(url: &str, options: AmqpOptions) -> Result<Self, BrokerError> {
        let uri = self::url::parse_url(url, &options)?;
        let tls = match uri.scheme {
            lapin::uri::AMQPScheme::AMQPS => {
                let settings = match &options.tls {
                    Some(s) => s.clone(),
                    None => crate::tls::TlsSettings::new(&Default::default(), None)
                        .map_err(|e| BrokerError::InvalidUrl(e.to_string()))?,
                };
                let config = settings
                    .rustls_config()
                    .map_err(|e| BrokerError::Connection(e.to_string()))?;
                Some((config, settings.trust()))
            }
            lapin::uri::AMQPScheme::AMQP => None,
        };
        let inner = Arc::new(Inner {
            uri,
            masked_url: mask_url(url),
            tls,
            options,
            session: Mutex::new(None),
            live_generation: AtomicU64::new(0),
            next_generation: AtomicU64::new(1),
            spec: Mutex::new(None),
            held: AtomicU32::new(0),
            shutdown: CancellationToken::new(),
            supervisor: Mutex::new(None),
        });
        let session = inner.open_session().await?;
        info!(url = %inner.masked_url, "connected to AMQP broker");
        inner.install(session).await;
        let handle = tokio::spawn(supervise(Arc::clone(&inner)));
        *inner.supervisor.lock().await = Some(handle);
        Ok(Self { inner })
    }

    /// `queue.declare(passive)` on a channel of its own (a missing queue closes the channel
    /// with 404, which must not touch the consumers' channels): the ready message count.
    pub async fn queue_length(&self, queue: &str) -> Result<Option<u64>, BrokerError> {
        let name = short(queue)?;
        let session = self.inner.current().await?;
        let channel = session.conn.create_channel().await.map_err(op_err)?;
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declared = channel
            .queue_declare(name, passive, lapin::types::FieldTable::default())
            .await;
        match declared {
            Ok(q) => {
                let _ = channel.close(200, ShortString::from("done")).await;
                Ok(Some(u64::from(q.message_count())))
            }
            // The server closed the channel already.
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => {
                let _ = channel.close(200, ShortString::from("done")).await;
                Err(op_err(e))
            }
        }
    }

    /// Declares kombu's entities for `queue` (exchange, queue, binding) on the
    /// live connection without consuming it.
    pub async fn declare_queue(&self, queue: &str) -> Result<(), BrokerError> {
        let session = self.inner.current().await?;
        let channel = session.conn.create_channel().await.map_err(op_err)?;
        let res = topology::declare_kombu_queue(&channel, queue).await;
        let _ = channel.close(200, ShortString::from("done")).await;
        res
    }
}

impl Drop for AmqpBroker {
    fn drop(&mut self) {
        // Without close(), still stop the supervisor; it closes the connection
        // on its way out, so RabbitMQ requeues whatever was unacked.
        self.inner.shutdown.cancel();
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    async fn declare_queue(&self, name: &str) -> Result<(), BrokerError> {
        AmqpBroker::declare_queue(self, name).await
    }

    async fn queue_length(&self, queue: &str) -> Result<Option<u64>, BrokerError> {
        AmqpBroker::queue_length(self, queue).await
    }

    async fn consume(
        &self,
        queues: &[String],
        prefetch: u16,
    ) -> Result<mpsc::Receiver<Delivery>, BrokerError> {
        self.inner.consume(queues, prefetch).await
    }

    async fn stop_consuming(&self) -> Result<(), BrokerError> {
        self.inner.stop_consuming().await
    }

    async fn set_prefetch(&self, prefetch: u16) -> Result<(), BrokerError> {
        self.inner.set_prefetch(prefetch).await
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Outgoing,
    ) -> Result<(), BrokerError> {
        self.inner.publish(exchange, routing_key, message).await
    }

    async fn close(&self) -> Result<(), BrokerError> {
        *self.inner.spec.lock().await = None;
        self.inner.shutdown.cancel();
        let handle = self.inner.supervisor.lock().await.take();
        if let Some(h) = handle {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
        // In case the supervisor was not running.
        shutdown_session(&self.inner).await;
        info!(url = %self.inner.masked_url, "closed AMQP connection");
        Ok(())
    }

    async fn subscribe_fanout(
        &self,
        subscription: FanoutSubscription,
    ) -> Result<mpsc::Receiver<RawMessage>, BrokerError> {
        fanout::subscribe(&self.inner, subscription)
    }

    async fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeType,
        durable: bool,
    ) -> Result<(), BrokerError> {
        self.inner.declare_exchange(name, kind, durable).await
    }

    async fn add_queue(&self, queue: &str) -> Result<(), BrokerError> {
        self.inner.add_queue(queue).await
    }

    async fn cancel_queue(&self, queue: &str) -> Result<(), BrokerError> {
        self.inner.cancel_queue(queue).await
    }
}

/// A failed broker operation (declare, consume, cancel, …) as a [`BrokerError`].
/// A channel closed by the server with `404 NOT_FOUND`.
fn is_not_found(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(err)
        if matches!(err.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

fn op_err(e: lapin::Error) -> BrokerError {
    BrokerError::Operation(e.to_string())
}

/// A name as an AMQP short string (at most 255 bytes), or an error that
/// quotes its start — never a panic on a long queue name or header key.
fn short(s: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(s)
        .map_err(|e| BrokerError::Unpublishable(format!("{e}: {:?}", truncate(s, 40))))
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}
