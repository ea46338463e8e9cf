//! `KernelClient`: shell, control and iopub channels to one kernel.
//!
//! Built directly on the pure-Rust `zeromq` crate with our own wire layer ([`super::wire`]):
//! the runtimed client crates churn fast and parse content into typed structs, while the
//! executor needs the raw JSON. One reader task per socket decodes frames and forwards them
//! into a single bounded channel, so the executor waits on one stream of [`ClientEvent`]s and
//! iopub is drained continuously (no output loss from an unpolled socket, cf. nbconvert #1183).
//! stdin and heartbeat are not connected: we never allow stdin, and liveness comes from the
//! child process status (see [`super::process`]).
//!
//! Two transports deliver the same [`Message`]s: ZeroMQ sockets (a real ipykernel app) and one
//! Unix stream socket to a forked shell (`python/om_shell.py`, [`KernelClient::over_socket`]).
//! On the socket every message is the ZeroMQ multipart message prefixed with its channel name,
//! framed as `u32le count, count × (u32le length, bytes)`, so both are decoded by the same
//! [`Message::from_frames_capped`].

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
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

/// Largest frame part accepted on a shell socket. The shell caps each output message at
/// [`MAX_CONTENT_BYTES`] before sending it, but a cell can bypass that (it owns the process): a
/// larger part is still read whole and cut like a ZeroMQ frame ([`Message::from_frames_capped`]),
/// up to this bound; past it the connection is closed and the run fails as a transport error
/// (ZeroMQ frames have no such bound).
pub const MAX_SOCKET_PART: usize = 16 * MAX_CONTENT_BYTES;

/// Most parts in one socket frame (channel, delimiter, signature, 4 JSON parts, buffers).
const MAX_SOCKET_PARTS: usize = 64;

/// Where requests go.
enum Outbound {
    /// A kernel app's shell and control sockets.
    Zmq {
        signer: Signer,
        shell: zeromq::DealerSendHalf,
        control: zeromq::DealerSendHalf,
    },
    /// A forked shell's socket (unsigned: private socket, peer checked by pid).
    Socket(OwnedWriteHalf),
}

/// Connected channels to one kernel. Dropping it stops the reader tasks.
pub struct KernelClient {
    session: String,
    out: Outbound,
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
            out: Outbound::Zmq {
                signer,
                shell: shell_tx,
                control: control_tx,
            },
            events,
            tasks,
        })
    }

    /// Channels to a forked shell over its (already accepted and peer-checked) socket.
    pub fn over_socket(stream: UnixStream) -> Self {
        let session = uuid::Uuid::new_v4().simple().to_string();
        let (tx, events) = mpsc::channel(EVENT_CAPACITY);
        let (read, write) = stream.into_split();
        KernelClient {
            session,
            out: Outbound::Socket(write),
            events,
            tasks: vec![tokio::spawn(socket_read_loop(read, tx))],
        }
    }

    /// Sends a request on shell; returns its msg_id.
    pub async fn send_shell(
        &mut self,
        msg_type: &str,
        content: Value,
    ) -> Result<String, KernelError> {
        self.request(Channel::Shell, msg_type, content).await
    }

    /// Sends a request on control; returns its msg_id.
    pub async fn send_control(
        &mut self,
        msg_type: &str,
        content: Value,
    ) -> Result<String, KernelError> {
        self.request(Channel::Control, msg_type, content).await
    }

    async fn request(
        &mut self,
        channel: Channel,
        msg_type: &str,
        content: Value,
    ) -> Result<String, KernelError> {
        let msg = Message::new(msg_type, content, &self.session);
        let id = msg.msg_id().to_string();
        match &mut self.out {
            Outbound::Zmq {
                signer,
                shell,
                control,
            } => {
                let socket = if channel == Channel::Control {
                    control
                } else {
                    shell
                };
                send(socket, &msg, signer).await?;
            }
            Outbound::Socket(writer) => {
                let name: &[u8] = if channel == Channel::Control {
                    b"control"
                } else {
                    b"shell"
                };
                let mut parts = vec![name.to_vec()];
                parts.extend(msg.to_frames(&Signer::new("")));
                let data = encode_socket_frame(&parts);
                match tokio::time::timeout(SEND_TIMEOUT, writer.write_all(&data)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        return Err(KernelError::Transport(format!("send {msg_type}: {e}")))
                    }
                    Err(_) => {
                        return Err(KernelError::Transport(format!(
                            "send {msg_type} timed out after {SEND_TIMEOUT:?}"
                        )))
                    }
                }
            }
        }
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

/// One socket frame: `u32le count, count × (u32le length, bytes)`.
pub fn encode_socket_frame<B: AsRef<[u8]>>(parts: &[B]) -> Vec<u8> {
    let total: usize = parts.iter().map(|p| 4 + p.as_ref().len()).sum();
    let mut out = Vec::with_capacity(4 + total);
    out.extend_from_slice(&u32::try_from(parts.len()).unwrap_or(u32::MAX).to_le_bytes());
    for p in parts {
        let p = p.as_ref();
        out.extend_from_slice(&u32::try_from(p.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// Why a socket frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SocketFrameError {
    /// The socket failed or closed in the middle of a frame.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// More parts than any message has.
    #[error("frame of {0} parts")]
    TooManyParts(usize),
    /// A part over [`MAX_SOCKET_PART`].
    #[error("frame part of {0} bytes (limit {MAX_SOCKET_PART})")]
    Oversized(usize),
}

/// Reads one frame; `Ok(None)` at a clean end of stream (between frames).
pub async fn read_socket_frame<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<Vec<Vec<u8>>>, SocketFrameError> {
    let mut head = [0u8; 4];
    match reader.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let count = u32::from_le_bytes(head) as usize;
    if count > MAX_SOCKET_PARTS {
        return Err(SocketFrameError::TooManyParts(count));
    }
    let mut parts = Vec::with_capacity(count);
    for _ in 0..count {
        reader.read_exact(&mut head).await?;
        let len = u32::from_le_bytes(head) as usize;
        if len > MAX_SOCKET_PART {
            return Err(SocketFrameError::Oversized(len));
        }
        let mut part = vec![0u8; len];
        reader.read_exact(&mut part).await?;
        parts.push(part);
    }
    Ok(Some(parts))
}

/// The forked shell's socket → [`ClientEvent`]s (the channel is each frame's first part).
async fn socket_read_loop(read: OwnedReadHalf, tx: mpsc::Sender<ClientEvent>) {
    let mut reader = BufReader::with_capacity(64 * 1024, read);
    let signer = Signer::new("");
    loop {
        let parts = match read_socket_frame(&mut reader).await {
            Ok(Some(parts)) => parts,
            Ok(None) => {
                let _ = tx
                    .send(ClientEvent::Closed(
                        Channel::Shell,
                        "shell socket closed".into(),
                    ))
                    .await;
                return;
            }
            Err(e) => {
                let _ = tx
                    .send(ClientEvent::Closed(
                        Channel::Shell,
                        format!("shell socket: {e}"),
                    ))
                    .await;
                return;
            }
        };
        let size: usize = parts.iter().map(Vec::len).sum();
        if size > MAX_CONTENT_BYTES {
            tracing::info!(
                bytes = size,
                "kernel message over {MAX_CONTENT_BYTES} bytes: its large values are cut"
            );
        }
        let channel = match parts.first().map(Vec::as_slice) {
            Some(b"iopub") => Channel::IoPub,
            Some(b"shell") => Channel::Shell,
            Some(b"control") => Channel::Control,
            other => {
                tracing::warn!(
                    channel = %String::from_utf8_lossy(other.unwrap_or_default()),
                    "dropping a shell message on an unknown channel"
                );
                continue;
            }
        };
        match Message::from_frames_capped(&parts[1..], &signer, MAX_CONTENT_BYTES) {
            Ok(msg) => {
                drop(parts);
                if tx
                    .send(ClientEvent::Message(channel, Box::new(msg)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => tracing::warn!(?channel, error = %e, "dropping malformed kernel message"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn socket_frames_round_trip_and_bounds_are_enforced() {
        let parts: Vec<Vec<u8>> = vec![b"iopub".to_vec(), Vec::new(), vec![7u8; 70_000]];
        let data = encode_socket_frame(&parts);
        let mut r = &data[..];
        assert_eq!(read_socket_frame(&mut r).await.unwrap(), Some(parts));
        assert!(read_socket_frame(&mut r).await.unwrap().is_none());

        // a part larger than the bound is refused before anything is allocated for it
        let mut big = Vec::new();
        big.extend_from_slice(&1u32.to_le_bytes());
        big.extend_from_slice(&u32::try_from(MAX_SOCKET_PART + 1).unwrap().to_le_bytes());
        let mut r = &big[..];
        assert!(matches!(
            read_socket_frame(&mut r).await,
            Err(SocketFrameError::Oversized(_))
        ));
        let many = 1000u32.to_le_bytes();
        let mut r = &many[..];
        assert!(matches!(
            read_socket_frame(&mut r).await,
            Err(SocketFrameError::TooManyParts(1000))
        ));
        // cut in the middle of a frame: an error, not a clean end
        let mut r = &data[..data.len() - 1];
        assert!(read_socket_frame(&mut r).await.is_err());
    }

    #[tokio::test]
    async fn messages_over_a_socket_become_client_events() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut client = KernelClient::over_socket(a);
        let (mut peer_read, mut peer_write) = b.into_split();
        // a request goes out as [channel, <IDS|MSG>, "", header, parent, metadata, content]
        let id = client
            .send_shell("kernel_info_request", serde_json::json!({}))
            .await
            .unwrap();
        let frame = read_socket_frame(&mut peer_read).await.unwrap().unwrap();
        assert_eq!(frame[0], b"shell");
        let req = Message::from_frames(&frame[1..], &Signer::new("")).unwrap();
        assert_eq!(req.msg_id(), id);
        // a reply on iopub comes back as an event of that channel
        let mut reply = Message::new(
            "status",
            serde_json::json!({"execution_state": "idle"}),
            "k",
        );
        reply.parent_header = req.header.clone();
        let mut parts = vec![b"iopub".to_vec()];
        parts.extend(reply.to_frames(&Signer::new("")));
        peer_write
            .write_all(&encode_socket_frame(&parts))
            .await
            .unwrap();
        match client.next_event().await {
            Some(ClientEvent::Message(Channel::IoPub, m)) => {
                assert_eq!(m.parent_msg_id(), Some(id.as_str()));
                assert_eq!(m.content["execution_state"], "idle");
            }
            other => panic!("unexpected {other:?}"),
        }
        drop(peer_write);
        drop(peer_read);
        assert!(matches!(
            client.next_event().await,
            Some(ClientEvent::Closed(Channel::Shell, _))
        ));
    }
}
