//! The one retrying query helper: [`Conn::query`] sends a command, a
//! pipeline or a script call and, on a connection-level error, reconnects
//! and sends it again (100 ms doubling back-off, a few attempts).
//!
//! Every command of the broker goes through here — all but the blocking
//! `BRPOP` (its own connection and loop) and the pub/sub subscription — so
//! what counts as "retry" (connection trouble) versus "fail" (an error
//! reply), the back-off and the error text are decided once.
//! Only idempotent requests — or ones where a duplicate is acceptable, like
//! an at-least-once publish — may be sent through it.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisResult, ScriptInvocation};
use tracing::debug;

use super::connection::{is_connection_error, Conn};
use crate::backoff::Backoff;
use crate::broker::BrokerError;

/// A request that can be sent again, unchanged, on a fresh connection.
pub(super) enum Request<'a> {
    /// One command.
    Cmd(&'a Cmd),
    /// A pipeline (`MULTI/EXEC` when built with `.atomic()`).
    Pipeline(&'a Pipeline),
    /// A Lua script call (`EVALSHA`, loading the script on `NOSCRIPT`).
    Script(&'a ScriptInvocation<'a>),
}

impl Request<'_> {
    /// Sends the request once and reads its reply.
    async fn send<T: FromRedisValue>(&self, c: &mut MultiplexedConnection) -> RedisResult<T> {
        match *self {
            Request::Cmd(cmd) => cmd.query_async(c).await,
            Request::Pipeline(pipe) => pipe.query_async(c).await,
            Request::Script(script) => script.invoke_async(c).await,
        }
    }
}

impl Conn {
    /// Sends `request`, reconnecting and retrying (100 ms doubling back-off
    /// up to the connection's cap) on connection-level errors, at most
    /// `attempts` times. `what` names the request in errors and logs.
    pub(super) async fn query<T: FromRedisValue>(
        &self,
        what: &str,
        attempts: u32,
        request: Request<'_>,
    ) -> Result<T, BrokerError> {
        let mut backoff = Backoff::new(Duration::from_millis(100), self.max_backoff);
        let mut last = String::new();
        for attempt in 0..attempts.max(1) {
            if attempt > 0 {
                backoff.wait().await;
            }
            let mut conn = match self.get().await {
                Ok(c) => c,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            match request.send(&mut conn).await {
                Ok(v) => return Ok(v),
                Err(e) if is_connection_error(&e) => {
                    debug!(error = %e, what, "Redis connection error; reconnecting");
                    self.invalidate().await;
                    last = e.to_string();
                }
                Err(e) => return Err(BrokerError::Operation(format!("{what}: {e}"))),
            }
        }
        Err(BrokerError::Connection(format!("{what}: {last}")))
    }
}
