//! The connection supervisor: at most one live [`Session`] (connection,
//! publish channel, consuming channel), replaced when it dies.
//!
//! lapin does not reconnect by itself. A background task ([`supervise`])
//! polls the session's health, and when the connection or a channel is gone
//! it closes the old connection (so RabbitMQ requeues its unacked messages),
//! reconnects with a doubling back-off, replays the consume spec and only
//! then installs the new session. Every session carries a generation number;
//! ackers compare it with [`Inner::live_generation`] so a delivery of a dead
//! connection is never acked on a new one.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use lapin::types::{LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;
use tracing::{error, info, warn};

use super::consume::ConsumeState;
use super::Inner;
use crate::backoff::Backoff;
use crate::broker::BrokerError;

/// One connection to RabbitMQ and the channels the broker uses on it.
pub(super) struct Session {
    pub(super) generation: u64,
    pub(super) conn: Connection,
    pub(super) publish: Channel,
    pub(super) consuming: Mutex<Option<ConsumeState>>,
}

impl Session {
    /// True while the connection and every channel we use are open.
    pub(super) async fn healthy(&self) -> bool {
        if !self.conn.status().connected() || !self.publish.status().connected() {
            return false;
        }
        match &*self.consuming.lock().await {
            Some(c) => c.channel.status().connected(),
            None => true,
        }
    }
}

impl Inner {
    pub(super) async fn open_session(&self) -> Result<Arc<Session>, BrokerError> {
        let mut props = ConnectionProperties::default();
        if let Some(name) = &self.options.connection_name {
            props = props.with_connection_name(LongString::from(name.as_str()));
        }
        let connect = async {
            match &self.tls {
                None => Connection::connect_uri(self.uri.clone(), props).await,
                Some((config, _)) => connect_tls(self.uri.clone(), Arc::clone(config), props).await,
            }
        };
        let conn = tokio::time::timeout(
            self.options.connect_timeout + Duration::from_secs(1),
            connect,
        )
        .await
        .map_err(|_| BrokerError::Connection("timed out connecting to the AMQP broker".into()))?
        .map_err(|e| {
            let text = e.to_string();
            let trust = self.tls.as_ref().map(|(_, t)| t.as_str());
            let explained = crate::tls::explain("amqps", trust, &text).or_else(|| {
                // only a TLS connection can have been closed for its certificate
                trust.and_then(|_| crate::tls::explain_closed("amqps", trust, &text))
            });
            BrokerError::Connection(explained.unwrap_or(text))
        })?;
        let publish = conn
            .create_channel()
            .await
            .map_err(|e| BrokerError::Connection(e.to_string()))?;
        Ok(Arc::new(Session {
            generation: self.next_generation.fetch_add(1, Ordering::SeqCst),
            conn,
            publish,
            consuming: Mutex::new(None),
        }))
    }

    pub(super) async fn install(&self, session: Arc<Session>) {
        self.live_generation
            .store(session.generation, Ordering::SeqCst);
        *self.session.lock().await = Some(session);
    }

    pub(super) async fn current(&self) -> Result<Arc<Session>, BrokerError> {
        self.session
            .lock()
            .await
            .clone()
            .ok_or_else(|| BrokerError::Connection("not connected to the AMQP broker".into()))
    }

    /// The live session, waiting up to `wait` for the supervisor to reconnect.
    pub(super) async fn current_or_wait(
        &self,
        wait: Duration,
    ) -> Result<Arc<Session>, BrokerError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Ok(s) = self.current().await {
                if s.conn.status().connected() {
                    return Ok(s);
                }
            }
            if tokio::time::Instant::now() >= deadline || self.shutdown.is_cancelled() {
                return Err(BrokerError::Connection(
                    "not connected to the AMQP broker".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Connects over TLS with om-worker's own rustls configuration (what to
/// trust, `ssl_cert_reqs`, `ssl_check_hostname`, client certificates):
/// lapin's `OwnedTLSConfig` can only add CAs to the system roots.
async fn connect_tls(
    uri: lapin::uri::AMQPUri,
    config: Arc<rustls::ClientConfig>,
    props: ConnectionProperties,
) -> lapin::Result<Connection> {
    let runtime = lapin::runtime::default_runtime()?;
    let connector = lapin::tcp::RustlsConnector::from(config);
    Connection::connector(
        uri,
        runtime,
        async move |uri, runtime| {
            let host = uri.authority.host.clone();
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), uri.authority.port))
                    .await?
                    .collect();
            let plain = lapin::tcp::AsyncTcpStream::connect(&runtime, addrs).await?;
            Ok(plain.into_rustls(&connector, &host).await?)
        },
        props,
    )
    .await
}

/// Reconnects whenever the live session dies, until shutdown.
pub(super) async fn supervise(inner: Arc<Inner>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), inner.options.max_backoff);
    loop {
        // Wait for the current session to die.
        loop {
            let healthy = match inner.current().await {
                Ok(s) => s.healthy().await,
                Err(_) => false,
            };
            if !healthy {
                break;
            }
            tokio::select! {
                _ = inner.shutdown.cancelled() => {
                    shutdown_session(&inner).await;
                    return;
                }
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
        inner.live_generation.store(0, Ordering::SeqCst);
        let old = inner.session.lock().await.take();
        if let Some(old) = old {
            warn!(url = %inner.masked_url, "AMQP connection lost; reconnecting");
            // Make sure the broker sees the old connection gone (requeues).
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                old.conn.close(320, ShortString::from("reconnecting")),
            )
            .await;
        }
        // Reconnect with exponential backoff.
        loop {
            if inner.shutdown.is_cancelled() {
                return;
            }
            match inner.open_session().await {
                Ok(session) => {
                    // Hold the spec lock so consume()/stop_consuming() do not
                    // race with the replay.
                    let spec = inner.spec.lock().await;
                    let res = match &*spec {
                        Some(spec) => inner.start_consuming(&session, spec).await,
                        None => Ok(()),
                    };
                    match res {
                        Ok(()) => {
                            inner.install(Arc::clone(&session)).await;
                            drop(spec);
                            info!(url = %inner.masked_url, "reconnected to AMQP broker");
                            crate::telemetry::broker_reconnected();
                            backoff.reset();
                            break;
                        }
                        Err(e) => {
                            drop(spec);
                            error!(url = %inner.masked_url, error = %e,
                                "could not resume consuming after reconnect");
                            let _ = session.conn.close(320, ShortString::from("retry")).await;
                        }
                    }
                }
                Err(e) => {
                    warn!(url = %inner.masked_url, error = %e, retry_in = ?backoff.peek(),
                        "AMQP reconnect failed");
                }
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = inner.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// Closes the live session (if any) for good: RabbitMQ requeues whatever it
/// had unacked.
pub(super) async fn shutdown_session(inner: &Inner) {
    inner.live_generation.store(0, Ordering::SeqCst);
    if let Some(s) = inner.session.lock().await.take() {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            s.conn.close(200, ShortString::from("worker shutdown")),
        )
        .await;
    }
}
