//! An in-memory [`Broker`] for tests of the worker's own decisions.
//!
//! It is not a broker emulation for interop claims (those run against the
//! real RabbitMQ and Redis): it exists so the delivery pipeline — decode,
//! expiry, revoke, ETA holds, duplicates, settlement — can be unit-tested
//! without servers. Messages are pushed with [`MemoryBroker::push`]; every
//! settlement and publish is recorded for the test to inspect. Like
//! RabbitMQ, deliveries left unsettled go back to their queue (marked
//! redelivered) when the broker is closed, and `reject(requeue)` puts the
//! message back at once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::{mpsc, Notify};

use super::{Acker, Broker, BrokerError, Delivery};
use crate::protocol::{Outgoing, RawMessage};

/// How a delivery was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// `ack`.
    Acked,
    /// `reject(requeue = false)`: dead-lettered or dropped by the broker.
    Rejected,
    /// `reject(requeue = true)`: back on its queue.
    Requeued,
}

/// One settled delivery: its tag, the message's `correlation_id`, how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// Delivery tag (1, 2, ... in delivery order).
    pub tag: u64,
    /// The message's `correlation_id` (the task id for Celery messages).
    pub correlation_id: Option<String>,
    /// How it was settled.
    pub how: Settlement,
}

/// One published message.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// Exchange (`""` = default exchange, routed by queue name).
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// The message.
    pub message: Outgoing,
}

#[derive(Default)]
struct State {
    queues: HashMap<String, VecDeque<RawMessage>>,
    consumer: Option<mpsc::Sender<Delivery>>,
    consuming: Vec<String>,
    prefetch: u16,
    next_tag: u64,
    /// Delivered, not yet settled: tag → message.
    unsettled: HashMap<u64, RawMessage>,
    /// Unsettled deliveries counted against the prefetch limit.
    counted: usize,
    settled: Vec<Settled>,
    published: Vec<Published>,
    fail_acks: bool,
    /// Deliveries (by tag) whose next settlement fails.
    fail_tags: std::collections::HashSet<u64>,
    /// While set, settlements wait (a slow ack in flight).
    paused: bool,
    /// Settlements waiting while paused.
    waiting: usize,
    /// Settlements refused while `fail_acks` was on.
    failed_settlements: usize,
    fail_publish: bool,
    closed: bool,
}

struct Inner {
    state: Mutex<State>,
    /// Woken on every settlement and publish (tests wait on it).
    changed: Notify,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands queued messages to the consumer while the prefetch limit allows.
    fn pump(self: &Arc<Self>) {
        let mut st = self.lock();
        let Some(tx) = st.consumer.clone() else {
            return;
        };
        loop {
            if st.prefetch > 0 && st.counted >= usize::from(st.prefetch) {
                return;
            }
            let queues = st.consuming.clone();
            let Some(msg) = queues
                .iter()
                .find_map(|q| st.queues.get_mut(q).and_then(VecDeque::pop_front))
            else {
                return;
            };
            st.next_tag += 1;
            let tag = st.next_tag;
            st.unsettled.insert(tag, msg.clone());
            st.counted += 1;
            let acker = MemoryAcker {
                inner: Arc::clone(self),
                tag,
                held: Mutex::new(false),
            };
            let delivery = Delivery {
                message: msg,
                acker: Box::new(acker),
            };
            if tx.try_send(delivery).is_err() {
                // The worker stopped reading; the message stays unsettled and
                // returns to its queue on close.
                return;
            }
        }
    }

    fn settle(self: &Arc<Self>, tag: u64, held: bool, how: Settlement) -> Result<(), BrokerError> {
        {
            let mut st = self.lock();
            if st.fail_acks || st.fail_tags.remove(&tag) {
                st.failed_settlements += 1;
                drop(st);
                self.changed.notify_waiters();
                return Err(BrokerError::Connection("memory broker: acks fail".into()));
            }
            let Some(msg) = st.unsettled.remove(&tag) else {
                return Err(BrokerError::Operation(format!(
                    "delivery {tag} settled twice"
                )));
            };
            if !held {
                st.counted = st.counted.saturating_sub(1);
            }
            st.settled.push(Settled {
                tag,
                correlation_id: msg.correlation_id.clone(),
                how,
            });
            if how == Settlement::Requeued {
                let mut msg = msg;
                msg.redelivered = true;
                let q = msg.routing_key.clone();
                st.queues.entry(q).or_default().push_front(msg);
            }
        }
        self.changed.notify_waiters();
        self.pump();
        Ok(())
    }
}

/// The in-memory broker (see the module docs).
#[derive(Clone)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new() -> Self {
        MemoryBroker {
            inner: Arc::new(Inner {
                state: Mutex::default(),
                changed: Notify::new(),
            }),
        }
    }

    /// Puts `message` at the tail of its queue (`message.routing_key`).
    pub fn push(&self, message: RawMessage) {
        {
            let mut st = self.inner.lock();
            let q = message.routing_key.clone();
            st.queues.entry(q).or_default().push_back(message);
        }
        self.inner.pump();
    }

    /// Messages waiting on `queue` (not delivered, or delivered and returned).
    pub fn queued(&self, queue: &str) -> Vec<RawMessage> {
        let st = self.inner.lock();
        st.queues
            .get(queue)
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every settlement so far, in order.
    pub fn settled(&self) -> Vec<Settled> {
        self.inner.lock().settled.clone()
    }

    /// Deliveries handed out and not settled yet.
    pub fn unsettled(&self) -> usize {
        self.inner.lock().unsettled.len()
    }

    /// Every publish so far, in order.
    pub fn published(&self) -> Vec<Published> {
        self.inner.lock().published.clone()
    }

    /// Makes every following ack/reject fail as after a lost connection.
    pub fn fail_acks(&self, fail: bool) {
        self.inner.lock().fail_acks = fail;
    }

    /// Makes the next ack/reject of delivery `tag` (1, 2, ... in delivery
    /// order) fail as after a lost connection.
    pub fn fail_settlement_of(&self, tag: u64) {
        self.inner.lock().fail_tags.insert(tag);
    }

    /// While paused, acks/rejects wait (an ack in flight on a connection
    /// that is going away); they go on, failing or not, once resumed.
    pub fn pause_settlements(&self, paused: bool) {
        self.inner.lock().paused = paused;
        self.inner.changed.notify_waiters();
    }

    /// Acks/rejects waiting on [`MemoryBroker::pause_settlements`].
    pub fn settlements_waiting(&self) -> usize {
        self.inner.lock().waiting
    }

    /// Settlements refused so far by [`MemoryBroker::fail_acks`] (or
    /// [`MemoryBroker::fail_settlement_of`]).
    pub fn failed_settlements(&self) -> usize {
        self.inner.lock().failed_settlements
    }

    /// Makes every following publish fail.
    pub fn fail_publish(&self, fail: bool) {
        self.inner.lock().fail_publish = fail;
    }

    /// Whether [`Broker::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.inner.lock().closed
    }

    /// Waits until `done` holds for this broker (checked after every
    /// settlement and publish).
    pub async fn wait_until(&self, done: impl Fn(&MemoryBroker) -> bool) {
        loop {
            let changed = self.inner.changed.notified();
            if done(self) {
                return;
            }
            changed.await;
        }
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn consume(
        &self,
        queues: &[String],
        prefetch: u16,
    ) -> Result<mpsc::Receiver<Delivery>, BrokerError> {
        let (tx, rx) = mpsc::channel(1024);
        {
            let mut st = self.inner.lock();
            st.consumer = Some(tx);
            st.consuming = queues.to_vec();
            st.prefetch = prefetch;
        }
        self.inner.pump();
        Ok(rx)
    }

    async fn stop_consuming(&self) -> Result<(), BrokerError> {
        self.inner.lock().consumer = None;
        Ok(())
    }

    async fn set_prefetch(&self, prefetch: u16) -> Result<(), BrokerError> {
        {
            let mut st = self.inner.lock();
            if st.prefetch == 0 || prefetch == 0 {
                return Ok(());
            }
            st.prefetch = prefetch;
        }
        self.inner.pump();
        Ok(())
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Outgoing,
    ) -> Result<(), BrokerError> {
        {
            let mut st = self.inner.lock();
            if st.fail_publish {
                return Err(BrokerError::Connection(
                    "memory broker: publish fails".into(),
                ));
            }
            st.published.push(Published {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                message,
            });
        }
        self.inner.changed.notify_waiters();
        Ok(())
    }

    async fn declare_queue(&self, name: &str) -> Result<(), BrokerError> {
        self.inner.lock().queues.entry(name.to_owned()).or_default();
        Ok(())
    }

    async fn queue_length(&self, queue: &str) -> Result<Option<u64>, BrokerError> {
        Ok(self.inner.lock().queues.get(queue).map(|q| q.len() as u64))
    }

    async fn close(&self) -> Result<(), BrokerError> {
        {
            let mut st = self.inner.lock();
            st.consumer = None;
            st.closed = true;
            let mut back: Vec<_> = st.unsettled.drain().collect();
            back.sort_by_key(|(tag, _)| std::cmp::Reverse(*tag));
            for (_, mut msg) in back {
                msg.redelivered = true;
                let q = msg.routing_key.clone();
                st.queues.entry(q).or_default().push_front(msg);
            }
            st.counted = 0;
        }
        self.inner.changed.notify_waiters();
        Ok(())
    }
}

struct MemoryAcker {
    inner: Arc<Inner>,
    tag: u64,
    /// Held for an ETA: not counted against the prefetch limit.
    held: Mutex<bool>,
}

impl MemoryAcker {
    fn held(&self) -> bool {
        *self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits while settlements are paused.
    async fn unpaused(&self) {
        let mut counted = false;
        loop {
            let newly_waiting = {
                let mut st = self.inner.lock();
                if !st.paused {
                    if counted {
                        st.waiting -= 1;
                    }
                    return;
                }
                let newly = !counted;
                if newly {
                    st.waiting += 1;
                    counted = true;
                }
                newly
            };
            if newly_waiting {
                // Tests wait for this count: tell them, before listening.
                self.inner.changed.notify_waiters();
                continue;
            }
            let changed = self.inner.changed.notified();
            if !self.inner.lock().paused {
                continue;
            }
            changed.await;
        }
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.unpaused().await;
        self.inner.settle(self.tag, self.held(), Settlement::Acked)
    }

    async fn reject(&self, requeue: bool) -> Result<(), BrokerError> {
        self.unpaused().await;
        let how = if requeue {
            Settlement::Requeued
        } else {
            Settlement::Rejected
        };
        self.inner.settle(self.tag, self.held(), how)
    }

    async fn hold_outside_prefetch(&self) {
        {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            if *held {
                return;
            }
            *held = true;
            let mut st = self.inner.lock();
            st.counted = st.counted.saturating_sub(1);
        }
        self.inner.pump();
    }

    async fn end_hold(&self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if *held {
            *held = false;
            self.inner.lock().counted += 1;
        }
    }
}
