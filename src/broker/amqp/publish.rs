//! Publishing (replies, events, forwarded tasks) on the session's publish
//! channel.
//!
//! A publish that fails (closed channel or connection) is tried once more
//! after a short pause, on whatever session the supervisor has installed by
//! then (waiting up to twice the back-off cap for one), so a broker restart
//! does not cost the result of a task that just finished.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use tracing::warn;

use super::properties::outgoing_properties;
use super::{short, Inner};
use crate::broker::BrokerError;
use crate::protocol::Outgoing;

impl Inner {
    /// [`crate::broker::Broker::publish`].
    pub(super) async fn publish(
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
            let session = self.current_or_wait(self.options.max_backoff * 2).await?;
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
}
