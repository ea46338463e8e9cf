//! Topology: the exchanges, queues and bindings the worker declares, each
//! exactly as kombu declares it.
//!
//! RabbitMQ refuses a redeclaration with different flags or arguments
//! (`406 PRECONDITION_FAILED`, which closes the channel), and Celery clients
//! declare the same entities before they publish; so every flag here mirrors
//! kombu, whichever side declares first.

use std::collections::BTreeMap;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

use super::{op_err, short, Inner};
use crate::broker::{BrokerError, ExchangeType, FanoutSubscription};

/// kombu's `Queue(L, Exchange(L, 'direct'), routing_key=L).declare()`.
pub(super) async fn declare_kombu_queue(channel: &Channel, queue: &str) -> Result<(), BrokerError> {
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

impl Inner {
    /// [`crate::broker::Broker::declare_exchange`]: `exchange.declare` on the
    /// live connection, waiting briefly for a reconnect.
    pub(super) async fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeType,
        durable: bool,
    ) -> Result<(), BrokerError> {
        let session = self.current_or_wait(self.options.max_backoff * 2).await?;
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
}

fn exchange_kind(kind: ExchangeType) -> ExchangeKind {
    match kind {
        ExchangeType::Direct => ExchangeKind::Direct,
        ExchangeType::Topic => ExchangeKind::Topic,
        ExchangeType::Fanout => ExchangeKind::Fanout,
    }
}

/// kombu's pidbox declarations (`Mailbox.get_queue`): a non-durable fanout
/// exchange, our auto-delete queue with its expiry arguments, and the
/// binding. Returns the queue's name, ready for `basic.consume`.
pub(super) async fn declare_fanout_queue(
    channel: &Channel,
    sub: &FanoutSubscription,
) -> Result<ShortString, BrokerError> {
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
    Ok(queue)
}

/// A millisecond queue argument as py-amqp writes a small int (`I`).
fn ms_arg(ms: u32) -> AMQPValue {
    match i32::try_from(ms) {
        Ok(v) => AMQPValue::LongInt(v),
        Err(_) => AMQPValue::LongLongInt(i64::from(ms)),
    }
}
