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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{Acker, Broker, BrokerError, Delivery, ExchangeType, FanoutSubscription};
use crate::protocol::{Headers, Outgoing, RawMessage, Value};
use crate::redact::mask_url;

/// Deepest nesting converted between field tables and [`Value`]s.
const MAX_DEPTH: usize = 64;

/// Options for [`AmqpBroker::connect`].
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
}

impl Default for AmqpOptions {
    fn default() -> Self {
        Self {
            global_qos: true,
            heartbeat: None,
            connect_timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(2),
            connection_name: None,
        }
    }
}

/// A RabbitMQ connection speaking kombu's topology (see the module docs).
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

struct Inner {
    uri: AMQPUri,
    masked_url: String,
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
    /// [`Acker::hold_outside_prefetch`]).
    held: std::sync::atomic::AtomicU32,
    shutdown: CancellationToken,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Clone)]
struct ConsumeSpec {
    queues: Vec<String>,
    prefetch: u16,
    tx: mpsc::Sender<Delivery>,
}

struct Session {
    generation: u64,
    conn: Connection,
    publish: Channel,
    consuming: Mutex<Option<ConsumeState>>,
}

struct ConsumeState {
    channel: Channel,
    /// `(queue, consumer tag)`, so one queue can be cancelled at runtime.
    tags: Vec<(String, ShortString)>,
    pumps: Vec<JoinHandle<()>>,
}

impl Session {
    /// True while the connection and every channel we use are open.
    async fn healthy(&self) -> bool {
        if !self.conn.status().connected() || !self.publish.status().connected() {
            return false;
        }
        match &*self.consuming.lock().await {
            Some(c) => c.channel.status().connected(),
            None => true,
        }
    }
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
        let uri = parse_url(url, &options)?;
        let inner = Arc::new(Inner {
            uri,
            masked_url: mask_url(url),
            options,
            session: Mutex::new(None),
            live_generation: AtomicU64::new(0),
            next_generation: AtomicU64::new(1),
            spec: Mutex::new(None),
            held: std::sync::atomic::AtomicU32::new(0),
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

    /// Declares kombu's entities for `queue` (exchange, queue, binding) on the
    /// live connection without consuming it.
    pub async fn declare_queue(&self, queue: &str) -> Result<(), BrokerError> {
        let session = self.inner.current().await?;
        let channel = session.conn.create_channel().await.map_err(op_err)?;
        let res = declare_kombu_queue(&channel, queue).await;
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

impl Inner {
    async fn open_session(&self) -> Result<Arc<Session>, BrokerError> {
        let mut props = ConnectionProperties::default();
        if let Some(name) = &self.options.connection_name {
            props = props.with_connection_name(LongString::from(name.as_str()));
        }
        let conn = tokio::time::timeout(
            self.options.connect_timeout + Duration::from_secs(1),
            Connection::connect_uri(self.uri.clone(), props),
        )
        .await
        .map_err(|_| BrokerError::Connection("timed out connecting to the AMQP broker".into()))?
        .map_err(|e| BrokerError::Connection(e.to_string()))?;
        let publish = conn
            .create_channel()
            .await
            .map_err(|e| BrokerError::Connection(e.to_string()))?;
        Ok(Arc::new(Session {
            generation: self.next_generation.fetch_add(1, Ordering::SeqCst),
            conn,
            publish,
            consuming: Mutex::new(None),
        }))
    }

    async fn install(&self, session: Arc<Session>) {
        self.live_generation
            .store(session.generation, Ordering::SeqCst);
        *self.session.lock().await = Some(session);
    }

    async fn current(&self) -> Result<Arc<Session>, BrokerError> {
        self.session
            .lock()
            .await
            .clone()
            .ok_or_else(|| BrokerError::Connection("not connected to the AMQP broker".into()))
    }

    /// The live session, waiting up to `wait` for the supervisor to reconnect.
    async fn current_or_wait(&self, wait: Duration) -> Result<Arc<Session>, BrokerError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Ok(s) = self.current().await {
                if s.conn.status().connected() {
                    return Ok(s);
                }
            }
            if tokio::time::Instant::now() >= deadline || self.shutdown.is_cancelled() {
                return Err(BrokerError::Connection(
                    "not connected to the AMQP broker".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Declares and consumes `spec.queues` on a fresh channel of `session`.
    async fn start_consuming(
        self: &Arc<Self>,
        session: &Arc<Session>,
        spec: &ConsumeSpec,
    ) -> Result<(), BrokerError> {
        let channel = session.conn.create_channel().await.map_err(op_err)?;
        let res = self.setup_consumers(session, &channel, spec).await;
        match res {
            Ok(state) => {
                *session.consuming.lock().await = Some(state);
                Ok(())
            }
            Err(e) => {
                let _ = channel.close(200, ShortString::from("setup failed")).await;
                Err(e)
            }
        }
    }

    async fn setup_consumers(
        self: &Arc<Self>,
        session: &Arc<Session>,
        channel: &Channel,
        spec: &ConsumeSpec,
    ) -> Result<ConsumeState, BrokerError> {
        channel
            .basic_qos(
                self.prefetch_with_held(spec.prefetch),
                BasicQosOptions {
                    global: self.options.global_qos,
                },
            )
            .await
            .map_err(op_err)?;
        for q in &spec.queues {
            declare_kombu_queue(channel, q).await?;
        }
        let mut tags = Vec::new();
        let mut pumps = Vec::new();
        for (i, q) in spec.queues.iter().enumerate() {
            let tag = short(&format!("om-worker.{}.{}", session.generation, i))?;
            let consumer = channel
                .basic_consume(
                    short(q)?,
                    tag.clone(),
                    BasicConsumeOptions {
                        no_ack: false,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(op_err)?;
            tags.push((q.clone(), tag));
            pumps.push(tokio::spawn(pump(
                consumer,
                spec.tx.clone(),
                Arc::clone(self),
                session.generation,
            )));
        }
        Ok(ConsumeState {
            channel: channel.clone(),
            tags,
            pumps,
        })
    }
}

/// Forwards one lapin consumer's deliveries to the worker's channel.
async fn pump(
    mut consumer: lapin::Consumer,
    tx: mpsc::Sender<Delivery>,
    inner: Arc<Inner>,
    generation: u64,
) {
    while let Some(item) = consumer.next().await {
        let delivery = match item {
            Ok(d) => d,
            Err(e) => {
                // Always followed by the end of the stream; the supervisor
                // sees the dead channel and reconnects.
                debug!(error = %e, "AMQP consumer stream error");
                break;
            }
        };
        let message = to_raw_message(&delivery);
        let acker = AmqpAcker {
            acker: delivery.acker,
            generation,
            inner: Arc::clone(&inner),
        };
        if tx
            .send(Delivery {
                message,
                acker: Box::new(acker),
            })
            .await
            .is_err()
        {
            // The worker dropped its receiver: nothing will ever settle these,
            // RabbitMQ requeues them when the channel closes.
            break;
        }
    }
}

/// Reconnects whenever the live session dies, until shutdown.
async fn supervise(inner: Arc<Inner>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        // Wait for the current session to die.
        loop {
            let healthy = match inner.current().await {
                Ok(s) => s.healthy().await,
                Err(_) => false,
            };
            if !healthy {
                break;
            }
            tokio::select! {
                _ = inner.shutdown.cancelled() => {
                    shutdown_session(&inner).await;
                    return;
                }
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
        inner.live_generation.store(0, Ordering::SeqCst);
        let old = inner.session.lock().await.take();
        if let Some(old) = old {
            warn!(url = %inner.masked_url, "AMQP connection lost; reconnecting");
            // Make sure the broker sees the old connection gone (requeues).
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                old.conn.close(320, ShortString::from("reconnecting")),
            )
            .await;
        }
        // Reconnect with exponential backoff.
        loop {
            if inner.shutdown.is_cancelled() {
                return;
            }
            match inner.open_session().await {
                Ok(session) => {
                    // Hold the spec lock so consume()/stop_consuming() do not
                    // race with the replay.
                    let spec = inner.spec.lock().await;
                    let res = match &*spec {
                        Some(spec) => inner.start_consuming(&session, spec).await,
                        None => Ok(()),
                    };
                    match res {
                        Ok(()) => {
                            inner.install(Arc::clone(&session)).await;
                            drop(spec);
                            info!(url = %inner.masked_url, "reconnected to AMQP broker");
                            crate::telemetry::broker_reconnected();
                            backoff = Duration::from_millis(100);
                            break;
                        }
                        Err(e) => {
                            drop(spec);
                            error!(url = %inner.masked_url, error = %e,
                                "could not resume consuming after reconnect");
                            let _ = session.conn.close(320, ShortString::from("retry")).await;
                        }
                    }
                }
                Err(e) => {
                    warn!(url = %inner.masked_url, error = %e, retry_in = ?backoff,
                        "AMQP reconnect failed");
                }
            }
            tokio::select! {
                _ = inner.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(inner.options.max_backoff);
        }
    }
}

async fn shutdown_session(inner: &Inner) {
    inner.live_generation.store(0, Ordering::SeqCst);
    if let Some(s) = inner.session.lock().await.take() {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            s.conn.close(200, ShortString::from("worker shutdown")),
        )
        .await;
    }
}

/// kombu's `Queue(L, Exchange(L, 'direct'), routing_key=L).declare()`.
async fn declare_kombu_queue(channel: &Channel, queue: &str) -> Result<(), BrokerError> {
    let name = short(queue)?;
    channel
        .exchange_declare(
            name.clone(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                auto_delete: false,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(op_err)?;
    channel
        .queue_declare(
            name.clone(),
            QueueDeclareOptions {
                durable: true,
                exclusive: false,
                auto_delete: false,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(op_err)?;
    channel
        .queue_bind(
            name.clone(),
            name.clone(),
            name,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(op_err)
}

#[async_trait]
impl Broker for AmqpBroker {
    async fn declare_queue(&self, name: &str) -> Result<(), BrokerError> {
        AmqpBroker::declare_queue(self, name).await
    }

    async fn consume(
        &self,
        queues: &[String],
        prefetch: u16,
    ) -> Result<mpsc::Receiver<Delivery>, BrokerError> {
        let mut spec_slot = self.inner.spec.lock().await;
        if spec_slot.is_some() {
            return Err(BrokerError::Operation("already consuming".into()));
        }
        let (tx, rx) = mpsc::channel(usize::from(prefetch.max(1)).max(16));
        let spec = ConsumeSpec {
            queues: queues.to_vec(),
            prefetch,
            tx,
        };
        // The supervisor installs a new session only while holding the spec
        // lock (and replays the spec on it), so under this lock the installed
        // session cannot be consuming yet and no replay can race with us.
        let session = self.inner.session.lock().await.clone();
        if let Some(session) = session {
            if let Err(e) = self.inner.start_consuming(&session, &spec).await {
                if session.healthy().await {
                    // A real refusal (e.g. 406 inequivalent declaration).
                    return Err(e);
                }
                // The connection died under us: the supervisor will replay.
                warn!(error = %e, "AMQP connection lost while starting to consume; will resume");
            }
        }
        info!(queues = ?queues, prefetch, global_qos = self.inner.options.global_qos,
            "consuming from AMQP");
        *spec_slot = Some(spec);
        Ok(rx)
    }

    async fn stop_consuming(&self) -> Result<(), BrokerError> {
        let spec = self.inner.spec.lock().await.take();
        if spec.is_none() {
            return Ok(());
        }
        drop(spec);
        let session = self.inner.session.lock().await.clone();
        let Some(session) = session else {
            return Ok(());
        };
        let state = session.consuming.lock().await.take();
        if let Some(state) = state {
            for (_, tag) in &state.tags {
                if let Err(e) = state
                    .channel
                    .basic_cancel(tag.clone(), BasicCancelOptions::default())
                    .await
                {
                    warn!(error = %e, "basic.cancel failed");
                }
            }
            // The pumps end when their consumer stream does; each holds a
            // sender clone, so the receiver closes once they are gone. The
            // channel stays open: unsettled deliveries can still be acked.
            for p in state.pumps {
                if tokio::time::timeout(Duration::from_secs(5), p)
                    .await
                    .is_err()
                {
                    warn!("AMQP consumer did not stop within 5 s");
                }
            }
            // Keep the channel alive for acks until close(); the session
            // holds the connection, and the channel handle is cheap.
            *session.consuming.lock().await = Some(ConsumeState {
                channel: state.channel,
                tags: Vec::new(),
                pumps: Vec::new(),
            });
        }
        Ok(())
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Outgoing,
    ) -> Result<(), BrokerError> {
        let props = outgoing_properties(&message)?;
        let exchange = short(exchange)?;
        let routing_key = short(routing_key)?;
        let mut last = None;
        for _ in 0..2 {
            let session = self
                .inner
                .current_or_wait(self.inner.options.max_backoff * 2)
                .await?;
            match session
                .publish
                .basic_publish(
                    exchange.clone(),
                    routing_key.clone(),
                    BasicPublishOptions::default(),
                    &message.body,
                    props.clone(),
                )
                .await
            {
                Ok(_confirm) => return Ok(()),
                Err(e) => {
                    warn!(error = %e, "AMQP publish failed");
                    last = Some(e);
                    // A closed channel or connection: let the supervisor
                    // reconnect, then try once more.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        Err(BrokerError::Operation(format!(
            "publish failed: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )))
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
        // Validate names now, so a bad nodename is reported at startup.
        short(&subscription.exchange)?;
        short(&subscription.queue)?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(fanout_loop(Arc::clone(&self.inner), subscription, tx));
        Ok(rx)
    }

    async fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeType,
        durable: bool,
    ) -> Result<(), BrokerError> {
        let session = self
            .inner
            .current_or_wait(self.inner.options.max_backoff * 2)
            .await?;
        // A channel of its own: an inequivalent declaration closes only it.
        let channel = session.conn.create_channel().await.map_err(op_err)?;
        let res = channel
            .exchange_declare(
                short(name)?,
                exchange_kind(kind),
                ExchangeDeclareOptions {
                    durable,
                    auto_delete: false,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(op_err);
        let _ = channel.close(200, ShortString::from("done")).await;
        res
    }

    async fn add_queue(&self, queue: &str) -> Result<(), BrokerError> {
        let mut spec_slot = self.inner.spec.lock().await;
        let Some(spec) = spec_slot.as_mut() else {
            return Err(BrokerError::Operation("not consuming".into()));
        };
        if spec.queues.iter().any(|q| q == queue) {
            return Ok(());
        }
        let session = self.inner.session.lock().await.clone();
        if let Some(session) = session {
            let mut consuming = session.consuming.lock().await;
            if let Some(state) = consuming.as_mut() {
                declare_kombu_queue(&state.channel, queue).await?;
                let n = ADDED_CONSUMERS.fetch_add(1, Ordering::SeqCst);
                let tag = short(&format!("om-worker.{}.added{n}", session.generation))?;
                let consumer = state
                    .channel
                    .basic_consume(
                        short(queue)?,
                        tag.clone(),
                        BasicConsumeOptions {
                            no_ack: false,
                            ..BasicConsumeOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(op_err)?;
                state.tags.push((queue.to_owned(), tag));
                state.pumps.push(tokio::spawn(pump(
                    consumer,
                    spec.tx.clone(),
                    Arc::clone(&self.inner),
                    session.generation,
                )));
            }
        }
        // Replayed by the supervisor after a reconnect.
        spec.queues.push(queue.to_owned());
        info!(queue, "started consuming queue");
        Ok(())
    }

    async fn cancel_queue(&self, queue: &str) -> Result<(), BrokerError> {
        let mut spec_slot = self.inner.spec.lock().await;
        let Some(spec) = spec_slot.as_mut() else {
            return Err(BrokerError::Operation("not consuming".into()));
        };
        spec.queues.retain(|q| q != queue);
        let session = self.inner.session.lock().await.clone();
        if let Some(session) = session {
            let mut consuming = session.consuming.lock().await;
            if let Some(state) = consuming.as_mut() {
                let (cancel, keep): (Vec<_>, Vec<_>) =
                    state.tags.drain(..).partition(|(q, _)| q == queue);
                state.tags = keep;
                for (_, tag) in cancel {
                    state
                        .channel
                        .basic_cancel(tag, BasicCancelOptions::default())
                        .await
                        .map_err(op_err)?;
                }
            }
        }
        info!(queue, "stopped consuming queue");
        Ok(())
    }
}

/// Numbers consumer tags of queues added at runtime (never reused).
static ADDED_CONSUMERS: AtomicU64 = AtomicU64::new(0);

fn exchange_kind(kind: ExchangeType) -> ExchangeKind {
    match kind {
        ExchangeType::Direct => ExchangeKind::Direct,
        ExchangeType::Topic => ExchangeKind::Topic,
        ExchangeType::Fanout => ExchangeKind::Fanout,
    }
}

/// Keeps one broadcast subscription alive: declare exchange, queue and
/// binding on a channel of the live connection, consume with `no_ack`,
/// forward; after the channel or connection dies, do it again on the next
/// one. Ends at broker shutdown or when the receiver is dropped.
async fn fanout_loop(inner: Arc<Inner>, sub: FanoutSubscription, tx: mpsc::Sender<RawMessage>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        if inner.shutdown.is_cancelled() || tx.is_closed() {
            break;
        }
        let session = match inner.current_or_wait(Duration::from_secs(5)).await {
            Ok(s) => s,
            Err(_) => continue,
        };
        match fanout_consume(&session, &sub).await {
            Ok((channel, mut consumer)) => {
                debug!(queue = %sub.queue, "consuming broadcast queue");
                backoff = Duration::from_millis(200);
                loop {
                    let item = tokio::select! {
                        _ = inner.shutdown.cancelled() => None,
                        i = consumer.next() => i,
                    };
                    match item {
                        Some(Ok(d)) => {
                            if tx.send(to_raw_message(&d)).await.is_err() {
                                break;
                            }
                        }
                        Some(Err(e)) => {
                            debug!(error = %e, queue = %sub.queue, "broadcast consumer error");
                            break;
                        }
                        None => break,
                    }
                }
                if channel.status().connected() {
                    let _ = channel.close(200, ShortString::from("done")).await;
                }
            }
            Err(e) => {
                warn!(queue = %sub.queue, error = %e, retry_in = ?backoff,
                    "could not subscribe to {}", sub.exchange);
            }
        }
        tokio::select! {
            _ = inner.shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(inner.options.max_backoff);
    }
    debug!(queue = %sub.queue, "broadcast subscription ended");
}

/// kombu's pidbox declarations (`Mailbox.get_queue`) and a `no_ack` consumer.
async fn fanout_consume(
    session: &Session,
    sub: &FanoutSubscription,
) -> Result<(Channel, lapin::Consumer), BrokerError> {
    let channel = session.conn.create_channel().await.map_err(op_err)?;
    let res = async {
        let exchange = short(&sub.exchange)?;
        let queue = short(&sub.queue)?;
        channel
            .exchange_declare(
                exchange.clone(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: false,
                    auto_delete: false,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(op_err)?;
        let mut args = BTreeMap::new();
        if let Some(ms) = sub.expires_ms {
            args.insert(short("x-expires")?, ms_arg(ms));
        }
        if let Some(ms) = sub.message_ttl_ms {
            args.insert(short("x-message-ttl")?, ms_arg(ms));
        }
        channel
            .queue_declare(
                queue.clone(),
                QueueDeclareOptions {
                    durable: false,
                    exclusive: sub.exclusive,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::from(args),
            )
            .await
            .map_err(op_err)?;
        channel
            .queue_bind(
                queue.clone(),
                exchange,
                ShortString::from(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(op_err)?;
        channel
            .basic_consume(
                queue,
                short(&format!(
                    "om-worker.fanout{}",
                    ADDED_CONSUMERS.fetch_add(1, Ordering::SeqCst)
                ))?,
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(op_err)
    }
    .await;
    match res {
        Ok(consumer) => Ok((channel, consumer)),
        Err(e) => {
            if channel.status().connected() {
                let _ = channel.close(200, ShortString::from("setup failed")).await;
            }
            Err(e)
        }
    }
}

/// A millisecond queue argument as py-amqp writes a small int (`I`).
fn ms_arg(ms: u32) -> AMQPValue {
    match i32::try_from(ms) {
        Ok(v) => AMQPValue::LongInt(v),
        Err(_) => AMQPValue::LongLongInt(i64::from(ms)),
    }
}

/// Settles one AMQP delivery; refuses when its connection is gone.
struct AmqpAcker {
    acker: lapin::Acker,
    generation: u64,
    inner: Arc<Inner>,
}

impl AmqpAcker {
    fn check_alive(&self) -> Result<(), BrokerError> {
        if self.inner.live_generation.load(Ordering::SeqCst) != self.generation {
            return Err(BrokerError::Connection(
                "the delivery's AMQP connection is gone; RabbitMQ has requeued the message".into(),
            ));
        }
        Ok(())
    }

    fn settled(res: lapin::Result<bool>, what: &str) -> Result<(), BrokerError> {
        match res {
            Ok(true) => Ok(()),
            Ok(false) => Err(BrokerError::Operation(format!(
                "{what}: delivery already settled or its channel is closed"
            ))),
            Err(e) => Err(BrokerError::Operation(format!("{what}: {e}"))),
        }
    }
}

impl Inner {
    /// The prefetch to ask for: what `consume` asked plus the held
    /// deliveries (0 stays 0 = unlimited).
    fn prefetch_with_held(&self, prefetch: u16) -> u16 {
        if prefetch == 0 {
            return 0;
        }
        let held = u16::try_from(self.held.load(Ordering::SeqCst)).unwrap_or(u16::MAX);
        prefetch.saturating_add(held)
    }

    /// Changes the held count and tells RabbitMQ the new prefetch.
    async fn adjust_held(&self, up: bool) {
        if up {
            self.held.fetch_add(1, Ordering::SeqCst);
        } else {
            let _ = self
                .held
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| h.checked_sub(1));
        }
        let Some(prefetch) = self.spec.lock().await.as_ref().map(|s| s.prefetch) else {
            return;
        };
        let prefetch = self.prefetch_with_held(prefetch);
        if prefetch == 0 {
            return;
        }
        let session = self.session.lock().await.clone();
        let Some(session) = session else { return };
        let consuming = session.consuming.lock().await;
        if let Some(state) = consuming.as_ref() {
            let qos = BasicQosOptions {
                global: self.options.global_qos,
            };
            if let Err(e) = state.channel.basic_qos(prefetch, qos).await {
                warn!(error = %e, "basic.qos({prefetch}) for ETA-held messages failed");
            }
        }
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn hold_outside_prefetch(&self) {
        self.inner.adjust_held(true).await;
    }

    async fn end_hold(&self) {
        self.inner.adjust_held(false).await;
    }

    async fn ack(&self) -> Result<(), BrokerError> {
        self.check_alive()?;
        Self::settled(
            self.acker.ack(BasicAckOptions { multiple: false }).await,
            "basic.ack",
        )
    }

    async fn reject(&self, requeue: bool) -> Result<(), BrokerError> {
        self.check_alive()?;
        Self::settled(
            self.acker.reject(BasicRejectOptions { requeue }).await,
            "basic.reject",
        )
    }
}

fn op_err(e: lapin::Error) -> BrokerError {
    BrokerError::Operation(e.to_string())
}

fn short(s: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(s)
        .map_err(|e| BrokerError::Operation(format!("{e}: {:?}", truncate(s, 40))))
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Parses an AMQP URL the way kombu does (`kombu/utils/url.py:url_to_parts`).
fn parse_url(url: &str, options: &AmqpOptions) -> Result<AMQPUri, BrokerError> {
    let bad = |why: &str| BrokerError::InvalidUrl(format!("{} ({why})", mask_url(url)));
    let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    let (scheme, default_port) = match parsed.scheme() {
        "amqp" | "pyamqp" => (AMQPScheme::AMQP, 5672),
        "amqps" | "pyamqps" => (AMQPScheme::AMQPS, 5671),
        other => return Err(bad(&format!("unsupported scheme {other:?}"))),
    };
    let decode = |s: &str| percent_decode(s).ok_or_else(|| bad("invalid percent-encoding"));
    let host = parsed.host_str().unwrap_or("localhost");
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let username = match parsed.username() {
        "" => "guest".to_owned(),
        u => decode(u)?,
    };
    let password = match parsed.password() {
        None => "guest".to_owned(),
        Some(p) => decode(p)?,
    };
    // kombu: strip one leading '/', unquote, empty means the default vhost '/'.
    let path = parsed.path();
    let path = path.strip_prefix('/').unwrap_or(path);
    let vhost = decode(path)?;
    let vhost = if vhost.is_empty() {
        "/".to_owned()
    } else {
        vhost
    };
    Ok(AMQPUri {
        scheme,
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo { username, password },
            host,
            port: parsed.port().unwrap_or(default_port),
        },
        vhost,
        query: AMQPQueryString {
            heartbeat: options.heartbeat,
            connection_timeout: u64::try_from(options.connect_timeout.as_millis()).ok(),
            ..AMQPQueryString::default()
        },
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn to_raw_message(d: &lapin::message::Delivery) -> RawMessage {
    let p = &d.properties;
    let s = |v: &Option<ShortString>| v.as_ref().map(|x| x.as_str().to_owned());
    RawMessage {
        body: d.data.clone(),
        content_type: s(p.content_type()),
        content_encoding: s(p.content_encoding()),
        headers: p
            .headers()
            .as_ref()
            .map(table_to_headers)
            .unwrap_or_default(),
        correlation_id: s(p.correlation_id()),
        reply_to: s(p.reply_to()),
        priority: *p.priority(),
        delivery_mode: *p.delivery_mode(),
        expiration: s(p.expiration()),
        redelivered: d.redelivered,
        exchange: d.exchange.as_str().to_owned(),
        routing_key: d.routing_key.as_str().to_owned(),
        transport_error: None,
    }
}

fn outgoing_properties(m: &Outgoing) -> Result<BasicProperties, BrokerError> {
    let mut p = BasicProperties::default()
        .with_content_type(short(&m.content_type)?)
        .with_content_encoding(short(&m.content_encoding)?)
        .with_delivery_mode(m.delivery_mode)
        .with_headers(headers_to_table(&m.headers)?);
    if let Some(c) = &m.correlation_id {
        p = p.with_correlation_id(short(c)?);
    }
    if let Some(r) = &m.reply_to {
        p = p.with_reply_to(short(r)?);
    }
    if let Some(pr) = m.priority {
        p = p.with_priority(pr);
    }
    if let Some(e) = &m.expiration {
        p = p.with_expiration(short(e)?);
    }
    Ok(p)
}

/// AMQP `application_headers` → [`Headers`], decoding every field type
/// py-amqp and RabbitMQ write (including `V` voids and nested tables/arrays).
pub fn table_to_headers(t: &FieldTable) -> Headers {
    t.inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), amqp_to_value(v)))
        .collect()
}

/// [`Headers`] → AMQP field table, using the types py-amqp would choose.
pub fn headers_to_table(h: &Headers) -> Result<FieldTable, BrokerError> {
    let mut map = BTreeMap::new();
    for (k, v) in h {
        map.insert(short(k)?, value_to_amqp_at(v, 0)?);
    }
    Ok(FieldTable::from(map))
}

/// One AMQP field value → [`Value`]. Like py-amqp: long strings become `str`
/// when they are UTF-8 (bytes otherwise), timestamps naive UTC datetimes,
/// decimals `Decimal(value) / 10**scale`.
pub fn amqp_to_value(v: &AMQPValue) -> Value {
    amqp_to_value_at(v, 0)
}

fn amqp_to_value_at(v: &AMQPValue, depth: usize) -> Value {
    if depth > MAX_DEPTH {
        return Value::None;
    }
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::ShortShortUInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::ShortInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::ShortUInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::LongInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::LongUInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::LongLongInt(i) => Value::Int(*i),
        AMQPValue::Float(f) => Value::Float(f64::from(*f)),
        AMQPValue::Double(f) => Value::Float(*f),
        AMQPValue::DecimalValue(d) => Value::Decimal(decimal_text(d)),
        AMQPValue::ShortString(s) => Value::Str(s.as_str().to_owned()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => Value::Str(text.to_owned()),
            Err(_) => Value::Bytes(s.as_bytes().to_vec()),
        },
        AMQPValue::ByteArray(b) => Value::Bytes(b.as_slice().to_vec()),
        AMQPValue::FieldArray(a) => Value::List(
            a.as_slice()
                .iter()
                .map(|x| amqp_to_value_at(x, depth + 1))
                .collect(),
        ),
        AMQPValue::FieldTable(t) => Value::Dict(
            t.inner()
                .iter()
                .map(|(k, x)| {
                    (
                        Value::Str(k.as_str().to_owned()),
                        amqp_to_value_at(x, depth + 1),
                    )
                })
                .collect(),
        ),
        AMQPValue::Timestamp(ts) => match i64::try_from(*ts)
            .ok()
            .and_then(|s| DateTime::from_timestamp(s, 0))
        {
            Some(dt) => Value::DateTime {
                naive: dt.naive_utc(),
                offset_seconds: None,
            },
            None => Value::Int(i64::try_from(*ts).unwrap_or(i64::MAX)),
        },
        AMQPValue::Void => Value::None,
    }
}

/// `Decimal(n) / Decimal(10**scale)` as Python prints it (trailing zeros of
/// the fraction dropped, as the division's ideal exponent does).
fn decimal_text(d: &DecimalValue) -> String {
    // py-amqp reads the value as a signed 32-bit integer.
    let n = i64::from(d.value as i32);
    let scale = usize::from(d.scale);
    let neg = n < 0;
    let digits = n.unsigned_abs().to_string();
    let (int_part, frac) = if digits.len() > scale {
        let (a, b) = digits.split_at(digits.len() - scale);
        (a.to_owned(), b.to_owned())
    } else {
        ("0".to_owned(), format!("{digits:0>scale$}"))
    };
    let frac = frac.trim_end_matches('0');
    let mut s = String::new();
    if neg {
        s.push('-');
    }
    s.push_str(&int_part);
    if !frac.is_empty() {
        s.push('.');
        s.push_str(frac);
    }
    s
}

/// [`Value`] → AMQP field value with py-amqp's type choices (`_write_item`):
/// `I` for ints within ±2147483647, `L`/`l` beyond, `d` for floats, `S` for
/// text, `T` for datetimes, `F`/`A` for dicts/sequences, `V` for `None`.
pub fn value_to_amqp(v: &Value) -> Result<AMQPValue, BrokerError> {
    value_to_amqp_at(v, 0)
}

fn value_to_amqp_at(v: &Value, depth: usize) -> Result<AMQPValue, BrokerError> {
    if depth > MAX_DEPTH {
        return Err(BrokerError::Operation(
            "header value nested too deeply".into(),
        ));
    }
    let long = |s: String| AMQPValue::LongString(LongString::from(s));
    Ok(match v {
        Value::None => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Int(i) => match i32::try_from(*i) {
            Ok(small) if small != i32::MIN => AMQPValue::LongInt(small),
            _ => AMQPValue::LongLongInt(*i),
        },
        Value::BigInt(s) => long(s.clone()),
        Value::Float(f) => AMQPValue::Double(*f),
        Value::Str(s) => long(s.clone()),
        Value::Bytes(b) => AMQPValue::ByteArray(ByteArray::from(b.clone())),
        Value::List(items) | Value::Tuple(items) | Value::Set(items) => {
            AMQPValue::FieldArray(FieldArray::from(
                items
                    .iter()
                    .map(|x| value_to_amqp_at(x, depth + 1))
                    .collect::<Result<Vec<_>, _>>()?,
            ))
        }
        Value::Dict(items) => {
            let mut map = BTreeMap::new();
            for (k, x) in items {
                let key = match k {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    Value::Bool(b) => if *b { "True" } else { "False" }.to_owned(),
                    Value::None => "None".to_owned(),
                    other => crate::protocol::json::to_json(other).to_string(),
                };
                map.insert(short(&key)?, value_to_amqp_at(x, depth + 1)?);
            }
            AMQPValue::FieldTable(FieldTable::from(map))
        }
        Value::DateTime {
            naive,
            offset_seconds,
        } => {
            let utc: NaiveDateTime =
                *naive - chrono::Duration::seconds(i64::from(offset_seconds.unwrap_or(0)));
            match u64::try_from(utc.and_utc().timestamp()) {
                Ok(ts) => AMQPValue::Timestamp(ts),
                Err(_) => long(crate::protocol::json::isoformat(v)),
            }
        }
        Value::Date(d) => long(d.format("%Y-%m-%d").to_string()),
        Value::Time(t) => long(t.format("%H:%M:%S%.f").to_string()),
        Value::TimeDelta {
            days,
            seconds,
            microseconds,
        } => AMQPValue::Double(
            (*days as f64) * 86400.0 + (*seconds as f64) + (*microseconds as f64) / 1e6,
        ),
        Value::Decimal(text) => decimal_value(text).unwrap_or_else(|| long(text.clone())),
        Value::Uuid(u) => long(u.hyphenated().to_string()),
        // py-amqp sees a dict (Signature) or str (PassthroughDataset) subclass.
        Value::Object(o) => return value_to_amqp_at(&o.plain(), depth),
    })
}

/// Decimal text → AMQP decimal when it fits (scale ≤ 255, |value| < 2³¹).
fn decimal_value(text: &str) -> Option<AMQPValue> {
    let t = text.trim();
    let (neg, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (int_part, frac) = t.split_once('.').unwrap_or((t, ""));
    if int_part.is_empty() && frac.is_empty() {
        return None;
    }
    if !int_part
        .chars()
        .chain(frac.chars())
        .all(|c| c.is_ascii_digit())
    {
        return None;
    }
    let scale = u8::try_from(frac.len()).ok()?;
    let n: i64 = format!("{int_part}{frac}").parse().ok()?;
    let n = if neg { -n } else { n };
    let n = i32::try_from(n).ok()?;
    Some(AMQPValue::DecimalValue(DecimalValue {
        scale,
        value: n as u32,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kombu_url_rules() {
        let o = AmqpOptions::default();
        let u = parse_url("amqp://guest:guest@127.0.0.1:5672//", &o).expect("url");
        assert_eq!(u.vhost, "/");
        assert_eq!(u.authority.port, 5672);
        let u = parse_url("amqp://u:p%40ss@h", &o).expect("url");
        assert_eq!(u.vhost, "/");
        assert_eq!(u.authority.userinfo.password, "p@ss");
        let u = parse_url("amqp://h/", &o).expect("url");
        assert_eq!(u.vhost, "/");
        assert_eq!(u.authority.userinfo.username, "guest");
        let u = parse_url("amqps://h/prod", &o).expect("url");
        assert_eq!(u.vhost, "prod");
        assert_eq!(u.scheme, AMQPScheme::AMQPS);
        assert_eq!(u.authority.port, 5671);
        let u = parse_url("amqp://h/%2f", &o).expect("url");
        assert_eq!(u.vhost, "/");
        assert!(parse_url("redis://h", &o).is_err());
        let err = parse_url("http://u:secret@h", &o).expect_err("bad scheme");
        assert!(!err.to_string().contains("secret"));
    }

    #[test]
    fn field_values_round_trip() {
        let v = Value::dict([
            ("none", Value::None),
            ("b", Value::Bool(true)),
            ("small", Value::Int(-5)),
            ("big", Value::Int(1 << 40)),
            ("f", Value::Float(1.5)),
            ("s", Value::Str("héllo".into())),
            ("bytes", Value::Bytes(vec![0, 255])),
            ("list", Value::List(vec![Value::Int(1), Value::None])),
            ("dec", Value::Decimal("-12.50".into())),
        ]);
        let a = value_to_amqp(&v).expect("converts");
        let back = amqp_to_value(&a);
        let get = |k: &str| back.get(k).cloned();
        assert_eq!(get("none"), Some(Value::None));
        assert_eq!(get("b"), Some(Value::Bool(true)));
        assert_eq!(get("small"), Some(Value::Int(-5)));
        assert_eq!(get("big"), Some(Value::Int(1 << 40)));
        assert_eq!(get("f"), Some(Value::Float(1.5)));
        assert_eq!(get("s"), Some(Value::Str("héllo".into())));
        assert_eq!(get("bytes"), Some(Value::Bytes(vec![0, 255])));
        assert_eq!(
            get("list"),
            Some(Value::List(vec![Value::Int(1), Value::None]))
        );
        assert_eq!(get("dec"), Some(Value::Decimal("-12.5".into())));
    }

    #[test]
    fn decodes_all_wire_types() {
        assert_eq!(amqp_to_value(&AMQPValue::ShortShortInt(-1)), Value::Int(-1));
        assert_eq!(
            amqp_to_value(&AMQPValue::ShortUInt(65535)),
            Value::Int(65535)
        );
        assert_eq!(amqp_to_value(&AMQPValue::Float(0.5)), Value::Float(0.5));
        assert_eq!(
            amqp_to_value(&AMQPValue::LongString(LongString::from(vec![0xffu8]))),
            Value::Bytes(vec![0xff])
        );
        assert_eq!(
            amqp_to_value(&AMQPValue::DecimalValue(DecimalValue {
                scale: 3,
                value: 5
            })),
            Value::Decimal("0.005".into())
        );
        assert_eq!(
            amqp_to_value(&AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 100
            })),
            Value::Decimal("1".into())
        );
        match amqp_to_value(&AMQPValue::Timestamp(86400)) {
            Value::DateTime {
                naive,
                offset_seconds: None,
            } => assert_eq!(naive.to_string(), "1970-01-02 00:00:00"),
            other => panic!("{other:?}"),
        }
        // Far beyond chrono's range: no panic.
        let _ = amqp_to_value(&AMQPValue::Timestamp(u64::MAX));
    }

    #[test]
    fn long_keys_are_errors_not_panics() {
        let mut h = Headers::new();
        h.insert("k".repeat(300), Value::None);
        assert!(headers_to_table(&h).is_err());
        assert!(short(&"x".repeat(256)).is_err());
    }
}
