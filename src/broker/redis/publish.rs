//! Publishing as kombu's Redis transport does: `PUBLISH` on the fanout
//! channel for the fanout exchanges (events, remote control), otherwise an
//! `LPUSH` of the kombu envelope onto every queue the binding sets route to,
//! at the message's priority step.

use tracing::debug;

use super::query::Request;
use super::Shared;
use crate::broker::BrokerError;
use crate::protocol::{envelope, Outgoing};

impl Shared {
    /// [`crate::broker::Broker::publish`].
    pub(super) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Outgoing,
    ) -> Result<(), BrokerError> {
        let tag = uuid::Uuid::new_v4().to_string();
        let env = envelope::build(&message, exchange, routing_key, &tag);
        if self.opts.fanout_exchanges.iter().any(|e| e == exchange) {
            let mut channel = self.fanout_channel(exchange);
            if !routing_key.is_empty() {
                channel.push('/');
                channel.push_str(routing_key);
            }
            return self
                .cmd
                .query::<i64>(
                    "PUBLISH",
                    3,
                    Request::Cmd(redis::cmd("PUBLISH").arg(&channel).arg(&env)),
                )
                .await
                .map(|_| ());
        }
        let queues = self.lookup(exchange, routing_key).await?;
        if queues.is_empty() {
            debug!(
                exchange,
                routing_key, "no queue bound; message dropped as kombu does"
            );
        }
        let priority = message.priority.unwrap_or(0);
        for q in queues {
            let key = self.queue_key(&q, priority);
            self.cmd
                .query::<i64>(
                    "LPUSH",
                    3,
                    Request::Cmd(redis::cmd("LPUSH").arg(&key).arg(&env)),
                )
                .await?;
        }
        Ok(())
    }
}
