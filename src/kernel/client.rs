//! `KernelClient`: shell, control and iopub channels to one kernel.
//!
//! Built directly on the pure-Rust `zeromq` crate with our own wire layer ([`super::wire`]):
//! the runtimed client crates churn fast and parse content into typed structs, while the
//! executor needs the raw JSON. One reader task per socket decodes frames and forwards them
//! into a single bounded channel, so the executor waits on one stream of [`ClientEvent`]s and
//! iopub is drained continuously (no output loss from an unpolled socket, cf. nbconvert #1183).
//! stdin and heartbeat are not connected: we never allow stdin, and liveness comes from the
//! child process status (see [`super::process`]).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use super::wire::{Message, Signer};
use super::KernelError;

/// How long one send may take before the kernel is considered unreachable.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Capacity of the event channel. Readers wait when it is full, so memory stays bounded and the
/// backlog sits in the kernel's ZeroMQ queues instead.
const EVENT_CAPACITY: usize = 1024;

/// Largest message content decoded as it is. Outputs are capped per cell (10 MiB by
/// default, `--max-cell-output-mb`) after decoding; without this bound one 500 MB `print`
/// would be parsed whole first (about 2.8 times its size in worker memory). Larger content
/// is cut down while it is scanned ([`Message::from_frames_capped`]). The kernels of the
/// fork server also cap each output message at this size before sending it
/// (`python/om_forkserver.py`), so the frame itself stays this small too.
pub const MAX_CONTENT_BYTES: usize = 16 * 1024 * 1024;

/// Contents of a Jupyter connection file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// `"ipc"` or `"tcp"`.
    pub transport: String,
    /// IP address (tcp) or socket path prefix (ipc).
    pub ip: String,
    /// Shell port (ipc: path suffix).
    pub shell_port: u16,
    /// IOPub port.
    pub iopub_port: u16,
    /// Stdin port.
    pub stdin_port: u16,
    /// Control port.
    pub control_port: u16,
    /// Heartbeat port.
    pub hb_port: u16,
    /// HMAC key.
    pub key: String,
    /// Always `hmac-sha256`.
    pub signature_scheme: String,
    /// Kernel name, informational.
    #[serde(default)]
    pub kernel_name: String,
}

impl ConnectionInfo {
    /// ZeroMQ endpoint for a port (`ipc://<ip>-<port>` or `tcp://<ip>:<port>`).
    pub fn endpoint(&self, port: u16) -> String {
        if self.transport == "ipc" {
            format!("ipc://{}-{}", self.ip, port)
        } else {
            format!("tcp://{}:{}", self.ip, port)
        }
    }

    /// Socket file path for an ipc port.
    pub fn ipc_path(&self, port: u16) -> Option<PathBuf> {
        (self.transport == "ipc").then(|| PathBuf::from(format!("{}-{}", self.ip, port)))
    }
}

/// Which socket a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Shell (replies to execute/kernel_info requests).
    Shell,
    /// IOPub (outputs and status broadcasts).
    IoPub,
    /// Control (shutdown/interrupt replies).
    Control,
}

/// What the reader tasks deliver.
#[derive(Debug)]
pub enum ClientEvent {
    /// A decoded message.
    Message(Channel, Box<Message>),
    /// A socket stopped delivering (peer gone or socket error).
    Closed(Channel, String),
}

/// Connected channels to one kernel. Dropping it stops the reader tasks.
pub struct KernelClient {
    session: String,
    signer: Signer,
    shell: zeromq::DealerSendHalf,
    control: zeromq::DealerSendHalf,
    events: mpsc::Receiver<ClientEvent>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for KernelClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelClient")
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl Drop for KernelClient {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl KernelClient {
    /// Connects iopub (subscribed to everything) first, then shell and control.
    ///
    /// The caller must make sure the kernel has bound its sockets (for ipc: the socket files
    /// exist), otherwise `connect` retries with back-off until `timeout`.
    pub async fn connect(info: &ConnectionInfo, timeout: Duration) -> Result<Self, KernelError> {
        let signer = Signer::new(&info.key);
        let session = uuid::Uuid::new_v4().simple().to_string();
        let (tx, events) = mpsc::channel(EVENT_CAPACITY);

        let connect = async {
            let mut iopub = zeromq::SubSocket::new();
            iopub.subscribe("").await?;
            iopub.connect(&info.endpoint(info.iopub_port)).await?;
            let mut shell = zeromq::DealerSocket::new();
            shell.connect(&info.endpoint(info.shell_port)).await?;
            let mut control = zeromq::DealerSocket::new();
            control.connect(&info.endpoint(info.control_port)).await?;
            Ok::<_, zeromq::ZmqError>((iopub, shell, control))
        };
        let (iopub, shell, control) = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| KernelError::Startup("timed out connecting to the kernel sockets".into()))?
            .map_err(|e| KernelError::Transport(format!("connect: {e}")))?;

        let (shell_tx, shell_rx) = shell.split();
        let (control_tx, control_rx) = control.split();
        let tasks = vec![
            tokio::spawn(read_loop(iopub, Channel::IoPub, signer.clone(), tx.clone())),
            tokio::spawn(read_loop(
                shell_rx,
                Channel::Shell,
                signer.clone(),
                tx.clone(),
            )),
            tokio::spawn(read_loop(control_rx, Channel::Control, signer.clone(), tx)),
        ];
        Ok(KernelClient {
            session,
            signer,
            shell: shell_tx,
            control: control_tx,
            events,
            tasks,
        })
    }

    /// Sends a request on shell; returns its msg_id.
    pub async fn send_shell(
        &mut self,
        msg_type: &str,
        content: Value,
    ) -> Result<String, KernelError> {
        let msg = Message::new(msg_type, content, &self.session);
        let id = msg.msg_id().to_string();
        send(&mut self.shell, &msg, &self.signer).await?;
        Ok(id)
    }

    /// Sends a request on control; returns its msg_id.
    pub async fn send_control(
        &mut self,
        msg_type: &str,
        content: Value,
    ) -> Result<String, KernelError> {
        let msg = Message::new(msg_type, content, &self.session);
        let id = msg.msg_id().to_string();
        send(&mut self.control, &msg, &self.signer).await?;
        Ok(id)
    }

    /// Next message or close notice; `None` once all readers have ended.
    pub async fn next_event(&mut self) -> Option<ClientEvent> {
        self.events.recv().await
    }

    /// Session id used in our headers.
    pub fn session(&self) -> &str {
        &self.session
    }
}

async fn send(
    socket: &mut zeromq::DealerSendHalf,
    msg: &Message,
    signer: &Signer,
) -> Result<(), KernelError> {
    let mut frames = msg.to_frames(signer).into_iter();
    let first = frames.next().unwrap_or_default();
    let mut zmsg = ZmqMessage::from(first);
    for f in frames {
        zmsg.push_back(f.into());
    }
    match tokio::time::timeout(SEND_TIMEOUT, socket.send(zmsg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(KernelError::Transport(format!(
            "send {}: {e}",
            msg.msg_type()
        ))),
        Err(_) => Err(KernelError::Transport(format!(
            "send {} timed out after {:?}",
            msg.msg_type(),
            SEND_TIMEOUT
        ))),
    }
}

async fn read_loop<S: SocketRecv + Send>(
    mut socket: S,
    channel: Channel,
    signer: Signer,
    tx: mpsc::Sender<ClientEvent>,
) {
    loop {
        match socket.recv().await {
            Ok(zmsg) => {
                let frames = zmsg.into_vec();
                let size: usize = frames.iter().map(|f| f.len()).sum();
                if size > MAX_CONTENT_BYTES {
                    tracing::info!(
                        ?channel,
                        bytes = size,
                        "kernel message over {MAX_CONTENT_BYTES} bytes: its large values are cut"
                    );
                }
                let decoded = Message::from_frames_capped(&frames, &signer, MAX_CONTENT_BYTES);
                drop(frames);
                match decoded {
                    Ok(msg) => {
                        if tx
                            .send(ClientEvent::Message(channel, Box::new(msg)))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(?channel, error = %e, "dropping malformed kernel message")
                    }
                }
            }
            Err(e) => {
                let _ = tx.send(ClientEvent::Closed(channel, e.to_string())).await;
                return;
            }
        }
    }
}
