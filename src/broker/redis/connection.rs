//! [`Conn`]: one lazily (re)connected multiplexed Redis connection.
//!
//! redis-rs does not reconnect a `MultiplexedConnection` by itself; `Conn`
//! opens one on first use, hands out clones, and forgets it after a
//! connection-level error so the next use reconnects. Each `Conn` sets its
//! own response timeout: redis-rs 1.x defaults to 500 ms, which would cut a
//! 1 s `BRPOP` (see the module docs of [`super`]).

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError};
use tokio::sync::Mutex;

/// One lazily (re)connected multiplexed connection.
pub(super) struct Conn {
    client: Client,
    config: AsyncConnectionConfig,
    slot: Mutex<Option<MultiplexedConnection>>,
    /// Cap of the retry back-off of [`Conn::query`].
    pub(super) max_backoff: Duration,
    client_name: Option<String>,
}

impl Conn {
    /// A connection that is opened on first use; `response_timeout` bounds
    /// every reply on it (more than the `BRPOP` timeout on the blocking one).
    pub(super) fn new(
        client: Client,
        response_timeout: Duration,
        max_backoff: Duration,
        client_name: Option<String>,
    ) -> Self {
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        Self {
            client,
            config,
            slot: Mutex::new(None),
            max_backoff,
            client_name,
        }
    }

    /// The connection, opened (and named with `CLIENT SETNAME`) if there is
    /// none yet.
    pub(super) async fn get(&self) -> Result<MultiplexedConnection, RedisError> {
        let mut slot = self.slot.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let mut c = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        if let Some(name) = &self.client_name {
            redis::cmd("CLIENT")
                .arg("SETNAME")
                .arg(name)
                .query_async::<()>(&mut c)
                .await?;
        }
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Forgets the connection after an error; the next [`Conn::get`]
    /// reconnects.
    pub(super) async fn invalidate(&self) {
        *self.slot.lock().await = None;
    }
}

/// Errors after which the connection is not trusted any more (reconnect),
/// as opposed to a server's answer to one command.
pub(super) fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
}
