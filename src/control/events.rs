//! Celery events (`celery/events/dispatcher.py`, `celery/worker/heartbeat.py`):
//! `worker-online` at start, `worker-heartbeat` every [`HEARTBEAT_FREQ`]
//! seconds, `worker-offline` at shutdown, and task events when enabled.
//!
//! Monitors (`celery events`, Flower, `om.runtime.status()`) drop a worker
//! after `2 × freq` seconds without a heartbeat, so heartbeats are sent even
//! without `-E`. On AMQP events go to the `celeryev` topic exchange (durable)
//! with routing key `type.replace('-', '.')`; on Redis the broker publishes
//! them to the pub/sub channel `/<db>.celeryev/<routing key>`. Events are
//! fire-and-forget: a failed publish is logged (once per outage) and dropped,
//! never retried into a backlog.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value as Json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::state::{EventOut, WorkerState};
use crate::broker::{Broker, ExchangeType};
use crate::protocol::{Outgoing, Value};

/// The events exchange.
pub const EXCHANGE: &str = "celeryev";
/// Default heartbeat interval in seconds (Celery's `Heart.interval`, sent
/// as `freq`; `--heartbeat-interval` changes it).
pub const HEARTBEAT_FREQ: f64 = 2.0;

/// A requested heartbeat (the `heartbeat` broadcast) is sent at once and
/// once more this long after. Celery's `EventReceiver(wakeup=True)` sends
/// the broadcast before kombu's Redis transport subscribes (it subscribes
/// on the first `drain_events`), so an answer that comes back within a
/// millisecond, as om-worker's does, usually reaches nobody; the repeat
/// lands after the subscription, still far sooner than the next interval.
/// On AMQP the receiver's queue is bound first and the first answer counts.
pub const HEARTBEAT_ECHO: Duration = Duration::from_millis(250);

/// Routing key of an event type: `worker-heartbeat` → `worker.heartbeat`.
pub fn routing_key(kind: &str) -> String {
    kind.replace('-', ".")
}

/// The message for one event body: JSON, transient, header `hostname`.
pub fn outgoing(event: &Json, nodename: &str) -> Outgoing {
    let mut headers = crate::protocol::Headers::new();
    headers.insert("hostname".into(), Value::Str(nodename.to_owned()));
    Outgoing {
        body: serde_json::to_vec(event).unwrap_or_default(),
        content_type: "application/json".into(),
        content_encoding: "utf-8".into(),
        headers,
        delivery_mode: 1,
        ..Outgoing::default()
    }
}

/// Starts the events task; the state forwards task events and the offline
/// request to it. Returns once `worker-online` has been attempted.
pub async fn start(
    broker: Arc<dyn Broker>,
    state: Arc<WorkerState>,
    heartbeat: f64,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    state.set_events(tx);
    if let Err(e) = broker
        .declare_exchange(EXCHANGE, ExchangeType::Topic, true)
        .await
    {
        warn!("declaring exchange {EXCHANGE}: {e}; events may be lost");
    }
    // An interval below 10 ms (or not a number) falls back to the default:
    // a worker sending no heartbeats looks offline to every monitor.
    let freq = if heartbeat.is_finite() && heartbeat >= 0.01 {
        heartbeat
    } else {
        HEARTBEAT_FREQ
    };
    let publisher = Publisher {
        broker,
        state: Arc::clone(&state),
        failing: false,
        freq,
    };
    let mut publisher = publisher;
    publisher.worker("worker-online").await;
    info!(
        "sending worker events every {freq}s (task events {})",
        if state.task_events() { "on" } else { "off" }
    );
    tokio::spawn(publisher.run(rx, stop))
}

struct Publisher {
    broker: Arc<dyn Broker>,
    state: Arc<WorkerState>,
    /// True while publishes fail, so an outage is logged once.
    failing: bool,
    /// Heartbeat interval (s), also sent as `freq`.
    freq: f64,
}

impl Publisher {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<EventOut>, stop: CancellationToken) {
        let period = Duration::from_secs_f64(self.freq);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When the repeat of a requested heartbeat is due (requests within
        // one echo delay share it).
        let mut echo: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    self.worker("worker-offline").await;
                    break;
                }
                _ = tick.tick() => self.worker("worker-heartbeat").await,
                _ = tokio::time::sleep_until(echo.unwrap_or_else(tokio::time::Instant::now)), if echo.is_some() => {
                    echo = None;
                    self.worker("worker-heartbeat").await;
                }
                m = rx.recv() => match m {
                    Some(EventOut::Event(ev)) => self.publish(&ev).await,
                    Some(EventOut::Heartbeat) => {
                        self.worker("worker-heartbeat").await;
                        echo.get_or_insert_with(|| tokio::time::Instant::now() + HEARTBEAT_ECHO);
                    }
                    Some(EventOut::Offline(done)) => {
                        // Task events queued before this went out first.
                        while let Ok(EventOut::Event(ev)) = rx.try_recv() {
                            self.publish(&ev).await;
                        }
                        self.worker("worker-offline").await;
                        let _ = done.send(());
                        break;
                    }
                    None => break,
                },
            }
        }
        debug!("events publisher stopped");
    }

    async fn worker(&mut self, kind: &str) {
        let ev = self.state.worker_event(kind, self.freq);
        self.publish(&ev).await;
    }

    async fn publish(&mut self, ev: &Json) {
        let kind = ev.get("type").and_then(Json::as_str).unwrap_or("unknown");
        let rk = routing_key(kind);
        let msg = outgoing(ev, &self.state.nodename);
        match self.broker.publish(EXCHANGE, &rk, msg).await {
            Ok(()) => {
                if self.failing {
                    info!("events are published again");
                    self.failing = false;
                }
                debug!(event = kind, "event sent");
            }
            Err(e) => {
                if !self.failing {
                    warn!("could not publish event {kind}: {e} (events are dropped until the broker is back)");
                    self.failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_and_message() {
        assert_eq!(routing_key("worker-heartbeat"), "worker.heartbeat");
        assert_eq!(routing_key("task-succeeded"), "task.succeeded");
        let m = outgoing(&serde_json::json!({"type": "worker-online"}), "w@h");
        assert_eq!(m.content_type, "application/json");
        assert_eq!(m.delivery_mode, 1);
        assert_eq!(m.headers.get("hostname"), Some(&Value::Str("w@h".into())));
    }

    fn heartbeats(broker: &crate::broker::memory::MemoryBroker) -> usize {
        broker
            .published()
            .iter()
            .filter(|p| p.routing_key == "worker.heartbeat")
            .count()
    }

    /// A `heartbeat` request is answered at once and once more after
    /// [`HEARTBEAT_ECHO`]; requests within that delay share the repeat.
    #[tokio::test(start_paused = true)]
    async fn a_requested_heartbeat_is_sent_at_once_and_repeated_once() {
        let broker = Arc::new(crate::broker::memory::MemoryBroker::new());
        let state = Arc::new(WorkerState::new(
            "w@h",
            &["q".to_owned()],
            1,
            4,
            (0.0, 0.0),
            "memory://",
        ));
        let stop = CancellationToken::new();
        let task = start(broker.clone(), Arc::clone(&state), 120.0, stop.clone()).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(heartbeats(&broker), 0, "no heartbeat before the interval");
        state.heartbeat();
        state.heartbeat();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(heartbeats(&broker), 2, "each request answered at once");
        tokio::time::sleep(HEARTBEAT_ECHO).await;
        assert_eq!(heartbeats(&broker), 3, "one shared repeat");
        tokio::time::sleep(HEARTBEAT_ECHO * 4).await;
        assert_eq!(heartbeats(&broker), 3, "and no more until the interval");
        stop.cancel();
        task.await.expect("events task");
        let last = broker.published().pop().expect("offline event");
        assert_eq!(last.routing_key, "worker.offline");
    }
}
