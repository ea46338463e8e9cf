//! Consuming: kombu's declarations and one `basic.consume` per queue on a
//! channel of its own, QoS (prefetch, widened for ETA-held deliveries), and
//! queues added or cancelled at runtime by remote control.
//!
//! What `consume` asked for is kept as a [`ConsumeSpec`] so the supervisor
//! ([`super::session`]) can replay it on every new connection; one pump task
//! per consumer forwards lapin deliveries to the worker's channel.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::Channel;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::acker::AmqpAcker;
use super::properties::to_raw_message;
use super::session::Session;
use super::topology::declare_kombu_queue;
use super::{op_err, short, Inner};
use crate::broker::{BrokerError, Delivery};

/// What `consume` asked for, replayed after each reconnect.
#[derive(Clone)]
pub(super) struct ConsumeSpec {
    pub(super) queues: Vec<String>,
    pub(super) prefetch: u16,
    pub(super) tx: mpsc::Sender<Delivery>,
}

/// The consuming channel of one session and what runs on it.
pub(super) struct ConsumeState {
    pub(super) channel: Channel,
    /// `(queue, consumer tag)`, so one queue can be cancelled at runtime.
    pub(super) tags: Vec<(String, ShortString)>,
    pub(super) pumps: Vec<JoinHandle<()>>,
}

/// Numbers the consumer tags of queues added at runtime and of broadcast
/// subscriptions ([`super::fanout`]); never reused.
pub(super) static ADDED_CONSUMERS: AtomicU64 = AtomicU64::new(0);

impl Inner {
    /// Declares and consumes `spec.queues` on a fresh channel of `session`.
    pub(super) async fn start_consuming(
        self: &Arc<Self>,
        session: &Arc<Session>,
        spec: &ConsumeSpec,
    ) -> Result<(), BrokerError> {
        let channel = session.conn.create_channel().await.map_err(op_err)?;
        // Deliveries held for an ETA on an earlier connection were requeued
        // by RabbitMQ with it; they must not widen this channel's prefetch
        // (a far-future one would for hours, after every reconnect).
        self.held.store(0, Ordering::SeqCst);
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

    /// `basic.consume` of `queue` (acks on) and the task forwarding its deliveries.
    async fn start_consumer(
        self: &Arc<Self>,
        channel: &Channel,
        queue: &str,
        tag: ShortString,
        tx: &mpsc::Sender<Delivery>,
        generation: u64,
    ) -> Result<JoinHandle<()>, BrokerError> {
        let consumer = channel
            .basic_consume(
                short(queue)?,
                tag,
                BasicConsumeOptions {
                    no_ack: false,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(op_err)?;
        Ok(tokio::spawn(pump(
            consumer,
            tx.clone(),
            Arc::clone(self),
            generation,
        )))
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
            let pump = self
                .start_consumer(channel, q, tag.clone(), &spec.tx, session.generation)
                .await?;
            tags.push((q.clone(), tag));
            pumps.push(pump);
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

impl Inner {
    /// [`crate::broker::Broker::consume`]: declares and consumes `queues` on
    /// the live session (if any) and records the spec for the supervisor.
    pub(super) async fn consume(
        self: &Arc<Self>,
        queues: &[String],
        prefetch: u16,
    ) -> Result<mpsc::Receiver<Delivery>, BrokerError> {
        let mut spec_slot = self.spec.lock().await;
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
        let session = self.session.lock().await.clone();
        if let Some(session) = session {
            if let Err(e) = self.start_consuming(&session, &spec).await {
                if session.healthy().await {
                    // A real refusal (e.g. 406 inequivalent declaration).
                    return Err(e);
                }
                // The connection died under us: the supervisor will replay.
                warn!(error = %e, "AMQP connection lost while starting to consume; will resume");
            }
        }
        info!(queues = ?queues, prefetch, global_qos = self.options.global_qos,
            "consuming from AMQP");
        *spec_slot = Some(spec);
        Ok(rx)
    }

    /// [`crate::broker::Broker::stop_consuming`]: cancels every consumer and
    /// forgets the spec; the channel stays open for acks.
    pub(super) async fn stop_consuming(&self) -> Result<(), BrokerError> {
        let spec = self.spec.lock().await.take();
        if spec.is_none() {
            return Ok(());
        }
        drop(spec);
        let session = self.session.lock().await.clone();
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

    /// [`crate::broker::Broker::add_queue`]: one more consumer on the live
    /// consuming channel, and in the spec for later sessions.
    pub(super) async fn add_queue(self: &Arc<Self>, queue: &str) -> Result<(), BrokerError> {
        let mut spec_slot = self.spec.lock().await;
        let Some(spec) = spec_slot.as_mut() else {
            return Err(BrokerError::Operation("not consuming".into()));
        };
        if spec.queues.iter().any(|q| q == queue) {
            return Ok(());
        }
        let session = self.session.lock().await.clone();
        if let Some(session) = session {
            let mut consuming = session.consuming.lock().await;
            if let Some(state) = consuming.as_mut() {
                declare_kombu_queue(&state.channel, queue).await?;
                let n = ADDED_CONSUMERS.fetch_add(1, Ordering::SeqCst);
                let tag = short(&format!("om-worker.{}.added{n}", session.generation))?;
                let pump = self
                    .start_consumer(
                        &state.channel,
                        queue,
                        tag.clone(),
                        &spec.tx,
                        session.generation,
                    )
                    .await?;
                state.tags.push((queue.to_owned(), tag));
                state.pumps.push(pump);
            }
        }
        // Replayed by the supervisor after a reconnect.
        spec.queues.push(queue.to_owned());
        info!(queue, "started consuming queue");
        Ok(())
    }

    /// [`crate::broker::Broker::cancel_queue`]: `basic.cancel` for the
    /// queue's consumers, and out of the spec.
    pub(super) async fn cancel_queue(&self, queue: &str) -> Result<(), BrokerError> {
        let mut spec_slot = self.spec.lock().await;
        let Some(spec) = spec_slot.as_mut() else {
            return Err(BrokerError::Operation("not consuming".into()));
        };
        spec.queues.retain(|q| q != queue);
        let session = self.session.lock().await.clone();
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

    /// The prefetch to ask for: what `consume` asked plus the held
    /// deliveries (0 stays 0 = unlimited).
    fn prefetch_with_held(&self, prefetch: u16) -> u16 {
        if prefetch == 0 {
            return 0;
        }
        let held = u16::try_from(self.held.load(Ordering::SeqCst)).unwrap_or(u16::MAX);
        prefetch.saturating_add(held)
    }

    /// [`crate::broker::Broker::set_prefetch`]: the spec's prefetch (kept
    /// for reconnects) and `basic.qos` on the live consuming channel. RabbitMQ
    /// takes nothing back on a lower prefetch; it delivers the next message
    /// once fewer than the new count are unacked.
    pub(super) async fn set_prefetch(&self, prefetch: u16) -> Result<(), BrokerError> {
        let mut spec_slot = self.spec.lock().await;
        let Some(spec) = spec_slot.as_mut() else {
            return Err(BrokerError::Operation("not consuming".into()));
        };
        if spec.prefetch == 0 || prefetch == 0 {
            return Ok(());
        }
        spec.prefetch = prefetch;
        let qos_count = self.prefetch_with_held(prefetch);
        let session = self.session.lock().await.clone();
        if let Some(session) = session {
            let consuming = session.consuming.lock().await;
            if let Some(state) = consuming.as_ref() {
                let qos = BasicQosOptions {
                    global: self.options.global_qos,
                };
                state
                    .channel
                    .basic_qos(qos_count, qos)
                    .await
                    .map_err(op_err)?;
            }
        }
        info!(
            prefetch,
            qos = qos_count,
            "prefetch changed by remote control"
        );
        Ok(())
    }

    /// Changes the held count and tells RabbitMQ the new prefetch.
    pub(super) async fn adjust_held(&self, up: bool) {
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
