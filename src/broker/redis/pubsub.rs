//! Broadcast subscriptions (remote control): kombu's fanout emulation,
//! `PSUBSCRIBE` on a dedicated pub/sub connection.
//!
//! Pub/sub has no backlog and a subscription dies with its connection, so
//! the subscription task resubscribes with a back-off after a drop; messages
//! published meanwhile are lost, exactly as with kombu.

use std::sync::Arc;
use std::time::Duration;

use redis::RedisError;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::Shared;
use crate::backoff::Backoff;
use crate::broker::{BrokerError, FanoutSubscription};
use crate::protocol::{envelope, RawMessage};

impl Shared {
    /// [`crate::broker::Broker::subscribe_fanout`]: records kombu's binding,
    /// then starts the subscription task.
    pub(super) async fn subscribe_fanout(
        self: &Arc<Self>,
        subscription: FanoutSubscription,
    ) -> Result<mpsc::Receiver<RawMessage>, BrokerError> {
        self.bind_fanout_queue(&subscription).await?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(pubsub_loop(Arc::clone(self), subscription, tx));
        Ok(rx)
    }
}

/// kombu's fanout emulation: `PSUBSCRIBE /<db>.<exchange>` on a dedicated
/// pub/sub connection, each message a kombu envelope. Resubscribes after a
/// dropped connection (messages published meanwhile are lost, as with
/// kombu: pub/sub has no backlog). Ends at close or when the receiver is
/// dropped.
async fn pubsub_loop(shared: Arc<Shared>, sub: FanoutSubscription, tx: mpsc::Sender<RawMessage>) {
    use futures_util::StreamExt as _;
    let pattern = shared.fanout_channel(&sub.exchange);
    let mut backoff = Backoff::new(Duration::from_millis(200), shared.opts.max_backoff);
    loop {
        if shared.shutdown.is_cancelled() || tx.is_closed() {
            break;
        }
        let subscribed = async {
            let mut ps = shared.client.get_async_pubsub().await?;
            ps.psubscribe(&pattern).await?;
            Ok::<_, RedisError>(ps)
        }
        .await;
        match subscribed {
            Ok(mut ps) => {
                debug!(pattern, "subscribed to broadcast channel");
                backoff.reset();
                let mut stream = ps.on_message();
                loop {
                    let msg = tokio::select! {
                        _ = shared.shutdown.cancelled() => None,
                        m = stream.next() => m,
                    };
                    let Some(msg) = msg else { break };
                    match envelope::parse(msg.get_payload_bytes()) {
                        Ok((raw, _tag)) => {
                            if tx.send(raw).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            warn!(pattern, error = %e, "ignoring a broadcast that is not a kombu envelope")
                        }
                    }
                }
            }
            Err(e) => {
                warn!(pattern, error = %e, retry_in = ?backoff.peek(), "could not subscribe to {}", sub.exchange);
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    debug!(pattern, "broadcast subscription ended");
}
