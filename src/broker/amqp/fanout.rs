//! Broadcast subscriptions (remote control, `celery.pidbox`): a queue of
//! our own bound to a fanout exchange, consumed with `no_ack`.
//!
//! The subscription outlives connections: its task waits for the live
//! session, declares and consumes, and after the channel or connection dies
//! does it again on the next one (with its own back-off, so a refused
//! declaration — e.g. `405 RESOURCE_LOCKED` for a duplicate nodename — is
//! retried without spinning).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::{FieldTable, ShortString};
use lapin::Channel;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::consume::ADDED_CONSUMERS;
use super::properties::to_raw_message;
use super::session::Session;
use super::topology::declare_fanout_queue;
use super::{op_err, short, Inner};
use crate::backoff::Backoff;
use crate::broker::{BrokerError, FanoutSubscription};
use crate::protocol::RawMessage;

/// [`crate::broker::Broker::subscribe_fanout`]: validates the names now, so
/// a bad nodename is reported at startup, and starts the subscription task.
pub(super) fn subscribe(
    inner: &Arc<Inner>,
    subscription: FanoutSubscription,
) -> Result<mpsc::Receiver<RawMessage>, BrokerError> {
    short(&subscription.exchange)?;
    short(&subscription.queue)?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(fanout_loop(Arc::clone(inner), subscription, tx));
    Ok(rx)
}

/// Keeps one broadcast subscription alive: declare exchange, queue and
/// binding on a channel of the live connection, consume with `no_ack`,
/// forward; after the channel or connection dies, do it again on the next
/// one. Ends at broker shutdown or when the receiver is dropped.
async fn fanout_loop(inner: Arc<Inner>, sub: FanoutSubscription, tx: mpsc::Sender<RawMessage>) {
    let mut backoff = Backoff::new(Duration::from_millis(200), inner.options.max_backoff);
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
                backoff.reset();
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
                warn!(queue = %sub.queue, error = %e, retry_in = ?backoff.peek(),
                    "could not subscribe to {}", sub.exchange);
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = inner.shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
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
        let queue = declare_fanout_queue(&channel, sub).await?;
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
