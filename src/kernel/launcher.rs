//! Starting kernels: the [`KernelLauncher`] trait and the local-process [`LocalLauncher`].
//!
//! The executor only sees the trait, so a pool of pre-started kernels or a fork server can hand
//! out [`Kernel`]s later without touching it. A `Kernel` is "ready" when a `kernel_info_reply`
//! arrived on shell **and** iopub delivered something (ipykernel 7 sends `iopub_welcome` on
//! subscription; older kernels publish status for our kernel_info request), so no output of the
//! first cell can be lost to the ZeroMQ slow-joiner problem.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

use super::client::{Channel, ClientEvent, ConnectionInfo, KernelClient};
use super::kernelspec::{find_kernelspec, python_prefix, KernelSpec};
use super::process::{KernelExit, KernelProcess, KernelTracker};
use super::KernelError;

/// Environment for a kernel process, built per kernel (the worker never mutates its own env).
///
/// Default: inherit the worker's environment (like jupyter_client), then apply `remove`, then
/// `set`. The kernelspec's own `env` and `JPY_PARENT_PID` are applied by the launcher on top.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelEnv {
    /// Start from the worker's environment (default true via [`KernelEnv::inherit`]).
    pub inherit: bool,
    /// Variables to remove from the inherited environment.
    pub remove: BTreeSet<String>,
    /// Variables to set (override).
    pub set: BTreeMap<String, String>,
}

impl KernelEnv {
    /// The worker's environment, unchanged.
    pub fn inherit() -> Self {
        KernelEnv {
            inherit: true,
            ..Default::default()
        }
    }

    /// What omega|ml's worker gives its kernels (spec §7.7): the worker's environment with
    /// `OMEGA_MONGO_URL` and `OMEGA_BROKER` set to the values the worker itself uses. Passing the
    /// other `OMEGA_*` variables through (the Python worker removes some) is harmless.
    pub fn omega(mongo_url: &str, broker: Option<&str>) -> Self {
        let mut env = KernelEnv::inherit().with("OMEGA_MONGO_URL", mongo_url);
        if let Some(b) = broker {
            env = env.with("OMEGA_BROKER", b);
        }
        env
    }

    /// Adds/overrides one variable.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let key = key.into();
        self.remove.remove(&key);
        self.set.insert(key, value.into());
        self
    }

    /// Removes one variable.
    pub fn without(mut self, key: impl Into<String>) -> Self {
        let key = key.into();
        self.set.remove(&key);
        self.remove.insert(key);
        self
    }

    /// The resulting variables (before the kernelspec env).
    pub fn build(&self) -> BTreeMap<String, String> {
        let mut vars: BTreeMap<String, String> = if self.inherit {
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect()
        } else {
            BTreeMap::new()
        };
        for k in &self.remove {
            vars.remove(k);
        }
        vars.extend(self.set.clone());
        vars
    }
}

/// ZeroMQ transport for the kernel's sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// Unix domain sockets in a private 0700 directory: no TCP port, no ipykernel
    /// "running over TCP without encryption" warning. Default.
    #[default]
    Ipc,
    /// TCP on 127.0.0.1 (ports picked by the OS, held until just before spawn).
    Tcp,
}

/// What to launch and how.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// Kernelspec name (`python3` by default).
    pub kernel_name: String,
    /// Environment.
    pub env: KernelEnv,
    /// Working directory (omega|ml: `OMEGA_TMP`); `None` = the worker's cwd.
    pub cwd: Option<PathBuf>,
    /// Give up when the kernel is not ready after this long (nbclient: 60 s).
    pub startup_timeout: Duration,
    /// Address-space limit (RLIMIT_AS) in bytes for the kernel process; see [`LocalLauncher`].
    pub memory_limit_bytes: Option<u64>,
    /// Socket transport.
    pub transport: Transport,
    /// Extra kernel arguments appended to argv.
    pub extra_args: Vec<String>,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions {
            kernel_name: "python3".into(),
            env: KernelEnv::inherit(),
            cwd: None,
            startup_timeout: Duration::from_secs(60),
            memory_limit_bytes: None,
            transport: Transport::Ipc,
            extra_args: Vec::new(),
        }
    }
}

/// Starts kernels. Implementations: [`LocalLauncher`] (a fresh process per kernel),
/// [`super::forkserver::ForkServerLauncher`] (forked from a pre-imported Python) and
/// [`super::pool::PooledLauncher`] (pre-started kernels around either).
#[async_trait]
pub trait KernelLauncher: Send + Sync {
    /// Launches a kernel and returns it ready (see module docs).
    async fn launch(&self, opts: &LaunchOptions) -> Result<Kernel, KernelError>;

    /// Releases what the launcher keeps between launches (idle pooled kernels, a fork server).
    /// Kernels already handed out are not touched. Default: nothing to release.
    async fn shutdown(&self) {}
}

/// A private directory removed on drop (holds the connection file and ipc sockets).
#[derive(Debug)]
pub(crate) struct RuntimeDir(pub(crate) PathBuf);

impl RuntimeDir {
    /// Creates `om-kernel-<worker pid>-<uuid>` (0700) in the temp dir (or /tmp when that path is too long
    /// for ipc socket names).
    pub(crate) fn create() -> std::io::Result<Self> {
        let mut base = std::env::temp_dir();
        // ipc socket paths must fit in sun_path (108 bytes).
        if base.as_os_str().len() > 60 {
            base = PathBuf::from("/tmp");
        }
        let dir = base.join(format!(
            "om-kernel-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(RuntimeDir(dir))
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running, ready kernel. Dropping it SIGKILLs its process group (see
/// [`super::process`]); call [`Kernel::shutdown`] for the orderly path.
#[derive(Debug)]
pub struct Kernel {
    /// Channels.
    pub client: KernelClient,
    /// The process (group leader).
    pub process: KernelProcess,
    /// The kernelspec it was started from.
    pub spec: KernelSpec,
    /// Content of the first `kernel_info_reply` (has `language_info`).
    pub kernel_info: Value,
    /// Spawn → ready.
    pub startup_time: Duration,
    /// Connection file path (inside the private runtime dir); for a forked shell, its socket.
    pub connection_file: PathBuf,
    runtime_dir: Option<RuntimeDir>,
}

impl Kernel {
    /// A ready kernel; `endpoint` is its connection file or (a forked shell) its socket, inside
    /// `runtime_dir`, which is removed with the kernel.
    pub(crate) fn assemble(
        client: KernelClient,
        process: KernelProcess,
        spec: KernelSpec,
        kernel_info: Value,
        startup_time: Duration,
        endpoint: PathBuf,
        runtime_dir: RuntimeDir,
    ) -> Kernel {
        Kernel {
            client,
            process,
            spec,
            kernel_info,
            startup_time,
            connection_file: endpoint,
            runtime_dir: Some(runtime_dir),
        }
    }

    /// Interrupts the running cell: SIGINT to the process group (`interrupt_mode: signal`, the
    /// default), or `interrupt_request` on control (`interrupt_mode: message`).
    pub async fn interrupt(&mut self) -> Result<(), KernelError> {
        if self.spec.interrupt_mode == "message" {
            self.client
                .send_control("interrupt_request", json!({}))
                .await
                .map(|_| ())
        } else {
            self.process
                .signal_group(Signal::SIGINT)
                .map_err(|e| KernelError::Transport(format!("SIGINT: {e}")))
        }
    }

    /// `shutdown_request` on control, up to `grace` for the kernel to exit, then SIGKILL of the
    /// whole group (always, so subprocesses cannot outlive the kernel); removes the runtime dir.
    pub async fn shutdown(mut self, grace: Duration) -> Option<KernelExit> {
        if self.process.exit_status().is_none() && !grace.is_zero() {
            if let Err(e) = self
                .client
                .send_control("shutdown_request", json!({"restart": false}))
                .await
            {
                tracing::debug!(error = %e, "shutdown_request not sent");
            }
            self.process.shutdown(grace).await;
        } else {
            self.process.kill().await;
        }
        drop(self.runtime_dir.take());
        self.process.exit_status()
    }

    /// Kernel pid (= process group id).
    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// True while the kernel process is running (see [`KernelProcess::is_alive`]).
    pub fn is_alive(&self) -> bool {
        self.process.is_alive()
    }
}

/// Launches kernels as local child processes.
///
/// Memory limit: `unsafe_code` is denied, so no `pre_exec(setrlimit)`. Instead the kernel argv
/// is wrapped in util-linux `prlimit --as=N --` when `prlimit` is on PATH, else in
/// `<python> -c "import resource, os; setrlimit(RLIMIT_AS); os.execvp(...)"`. Both `exec` the
/// kernel, so the pid we watch and signal is the kernel itself.
#[derive(Debug, Clone)]
pub struct LocalLauncher {
    /// Python whose `<prefix>/share/jupyter/kernels` is searched and which runs the fallback
    /// ipykernel (e.g. `python3` from PATH).
    pub python: PathBuf,
    /// Where the kernels it starts are registered (see [`KernelTracker`]).
    kernels: KernelTracker,
}

impl LocalLauncher {
    /// A launcher for kernels of `python`, registering them in `kernels`.
    pub fn new(python: impl Into<PathBuf>, kernels: KernelTracker) -> Self {
        LocalLauncher {
            python: python.into(),
            kernels,
        }
    }

    /// The tracker its kernels are registered in.
    pub fn kernels(&self) -> &KernelTracker {
        &self.kernels
    }

    /// Resolves the kernelspec for `name` (see [`find_kernelspec`]).
    pub fn resolve(&self, name: &str) -> Result<KernelSpec, KernelError> {
        find_kernelspec(name, &self.python)
    }
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// `argv` wrapped so it runs under an address-space limit of `limit` bytes (see [`LocalLauncher`]).
pub(crate) fn wrap_memory_limit(argv: Vec<String>, limit: u64, python: &Path) -> Vec<String> {
    if let Some(prlimit) = find_in_path("prlimit") {
        let mut v = vec![
            prlimit.to_string_lossy().into_owned(),
            format!("--as={limit}"),
            "--".into(),
        ];
        v.extend(argv);
        v
    } else {
        let mut v = vec![
            python.to_string_lossy().into_owned(),
            "-c".into(),
            "import os, resource, sys; l = int(sys.argv[1]); \
             resource.setrlimit(resource.RLIMIT_AS, (l, l)); os.execvp(sys.argv[2], sys.argv[2:])"
                .into(),
            limit.to_string(),
        ];
        v.extend(argv);
        v
    }
}

fn write_connection_file(path: &Path, info: &ConnectionInfo) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let text = serde_json::to_vec_pretty(info).map_err(std::io::Error::other)?;
    f.write_all(&text)?;
    f.sync_all()
}

/// A connection file written into a fresh private runtime dir (random HMAC key; ipc sockets
/// inside the dir, or loopback TCP ports held open until [`PreparedConnection::release_ports`]).
#[derive(Debug)]
pub(crate) struct PreparedConnection {
    pub(crate) runtime_dir: RuntimeDir,
    pub(crate) info: ConnectionInfo,
    pub(crate) connection_file: PathBuf,
    held: Vec<std::net::TcpListener>,
}

impl PreparedConnection {
    /// Writes the connection file for a kernel of `kernel_name` with `transport`.
    pub(crate) fn create(kernel_name: &str, transport: Transport) -> Result<Self, KernelError> {
        let runtime_dir =
            RuntimeDir::create().map_err(|e| KernelError::Startup(format!("runtime dir: {e}")))?;
        let key = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );

        // TCP: hold the listeners until just before spawn to narrow the port race.
        let mut held = Vec::new();
        let (ip, ports) = match transport {
            Transport::Ipc => (
                runtime_dir.0.join("kernel").to_string_lossy().into_owned(),
                [1u16, 2, 3, 4, 5],
            ),
            Transport::Tcp => {
                let mut ports = [0u16; 5];
                for p in &mut ports {
                    let l = std::net::TcpListener::bind(("127.0.0.1", 0))
                        .map_err(|e| KernelError::Startup(format!("port: {e}")))?;
                    *p = l
                        .local_addr()
                        .map_err(|e| KernelError::Startup(format!("port: {e}")))?
                        .port();
                    held.push(l);
                }
                ("127.0.0.1".to_string(), ports)
            }
        };
        let info = ConnectionInfo {
            transport: match transport {
                Transport::Ipc => "ipc".into(),
                Transport::Tcp => "tcp".into(),
            },
            ip,
            shell_port: ports[0],
            iopub_port: ports[1],
            stdin_port: ports[2],
            control_port: ports[3],
            hb_port: ports[4],
            key,
            signature_scheme: "hmac-sha256".into(),
            kernel_name: kernel_name.to_string(),
        };
        let connection_file = runtime_dir.0.join("kernel.json");
        write_connection_file(&connection_file, &info)
            .map_err(|e| KernelError::Startup(format!("connection file: {e}")))?;
        Ok(PreparedConnection {
            runtime_dir,
            info,
            connection_file,
            held,
        })
    }

    /// Frees the held TCP ports right before the kernel binds them.
    pub(crate) fn release_ports(&mut self) {
        self.held.clear();
    }

    /// Waits (bounded by `opts.startup_timeout`) until the kernel is ready, or fails when the
    /// process exits first. The caller kills the process on error.
    pub(crate) async fn wait_ready(
        &self,
        process: &KernelProcess,
        opts: &LaunchOptions,
    ) -> Result<(KernelClient, Value), KernelError> {
        let info = &self.info;
        let deadline = tokio::time::Instant::now() + opts.startup_timeout;
        let ready = async {
            // ipc: wait for the socket files instead of relying on connect back-off (which
            // would add up to a few hundred ms of sleeping).
            for port in [info.iopub_port, info.shell_port, info.control_port] {
                if let Some(path) = info.ipc_path(port) {
                    while !path.exists() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            let mut client = KernelClient::connect(info, opts.startup_timeout).await?;
            let kernel_info = wait_ready(&mut client).await?;
            Ok::<_, KernelError>((client, kernel_info))
        };
        tokio::select! {
            r = ready => r,
            status = process.exited() => Err(KernelError::Died(format!("kernel exited during startup: {status}"))),
            _ = tokio::time::sleep_until(deadline) => Err(KernelError::Startup(format!(
                "kernel not ready after {:?}", opts.startup_timeout))),
        }
    }

    /// Assembles the ready kernel (the runtime dir lives as long as the kernel).
    pub(crate) fn into_kernel(
        self,
        client: KernelClient,
        process: KernelProcess,
        spec: KernelSpec,
        kernel_info: Value,
        startup_time: Duration,
    ) -> Kernel {
        Kernel::assemble(
            client,
            process,
            spec,
            kernel_info,
            startup_time,
            self.connection_file,
            self.runtime_dir,
        )
    }
}

/// The environment a kernel of `spec` gets: `opts.env`, then the kernelspec's `env`
/// (like jupyter_client). `JPY_PARENT_PID` is added by whoever spawns the process.
pub(crate) fn kernel_env_vars(env: &KernelEnv, spec: &KernelSpec) -> BTreeMap<String, String> {
    let mut vars = env.build();
    vars.extend(spec.env.clone());
    vars
}

#[async_trait]
impl KernelLauncher for LocalLauncher {
    async fn launch(&self, opts: &LaunchOptions) -> Result<Kernel, KernelError> {
        let started = Instant::now();
        let spec = self.resolve(&opts.kernel_name)?;
        let mut conn = PreparedConnection::create(&spec.name, opts.transport)?;

        let prefix = python_prefix(&self.python);
        let mut argv = spec.expand_argv(&conn.connection_file, prefix.as_deref());
        if spec.is_ipykernel() {
            // nbclient's ipython_hist_file default; omega|ml's kernels run with it.
            argv.push("--HistoryManager.hist_file=:memory:".into());
        }
        argv.extend(opts.extra_args.iter().cloned());
        if let Some(limit) = opts.memory_limit_bytes {
            argv = wrap_memory_limit(argv, limit, &self.python);
        }

        let mut env = kernel_env_vars(&opts.env, &spec);
        env.insert("JPY_PARENT_PID".into(), std::process::id().to_string());

        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .envs(&env)
            .stdin(std::process::Stdio::null())
            // logged line by line, escaped (crate::logging::forward_child_stderr)
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(cwd) = &opts.cwd {
            cmd.current_dir(cwd);
        }
        tracing::debug!(?argv, cwd = ?opts.cwd, "spawning kernel");
        conn.release_ports();
        let mut child = cmd
            .spawn()
            .map_err(|e| KernelError::Startup(format!("spawn {}: {e}", argv[0])))?;
        if let Some(stderr) = child.stderr.take() {
            let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
            crate::logging::forward_child_stderr(stderr, "kernel stderr", pid);
        }
        let process = KernelProcess::adopt(child, &self.kernels)
            .map_err(|e| KernelError::Startup(format!("adopt kernel: {e}")))?;

        match conn.wait_ready(&process, opts).await {
            Ok((client, kernel_info)) => {
                Ok(conn.into_kernel(client, process, spec, kernel_info, started.elapsed()))
            }
            Err(e) => {
                process.kill().await;
                Err(e)
            }
        }
    }
}

/// kernel_info handshake: resend every 500 ms until a reply arrived and iopub is live.
pub(crate) async fn wait_ready(client: &mut KernelClient) -> Result<Value, KernelError> {
    let mut reply: Option<Value> = None;
    let mut iopub_live = false;
    client.send_shell("kernel_info_request", json!({})).await?;
    let mut resend = tokio::time::Instant::now() + Duration::from_millis(500);
    loop {
        if iopub_live {
            if let Some(r) = reply.take() {
                return Ok(r);
            }
        }
        tokio::select! {
            ev = client.next_event() => match ev {
                Some(ClientEvent::Message(Channel::IoPub, _)) => iopub_live = true,
                Some(ClientEvent::Message(Channel::Shell, m)) if m.msg_type() == "kernel_info_reply" => {
                    if reply.is_none() {
                        reply = Some(m.content);
                    }
                }
                Some(ClientEvent::Message(..)) => {}
                Some(ClientEvent::Closed(ch, e)) => {
                    return Err(KernelError::Transport(format!("{ch:?} closed during startup: {e}")))
                }
                None => return Err(KernelError::Transport("kernel channels closed".into())),
            },
            _ = tokio::time::sleep_until(resend) => {
                client.send_shell("kernel_info_request", json!({})).await?;
                resend = tokio::time::Instant::now() + Duration::from_millis(500);
            }
        }
    }
}

/// Removes `om-kernel-*` runtime dirs in the temp dir that are older than `min_age`, whose
/// creating worker (the pid in the name) is gone and that no live process's command line
/// references. They are left behind only when a worker was SIGKILLed (the kernel then exits on
/// its own via `JPY_PARENT_PID`, but nobody removes its connection file); call this at worker
/// start-up. Dirs of other live workers on the host are never touched: their fork-server
/// kernels do not show the path in their command line. Returns how many were removed.
pub fn sweep_stale_runtime_dirs(min_age: Duration) -> usize {
    let mut bases = vec![std::env::temp_dir()];
    if bases[0] != Path::new("/tmp") {
        bases.push(PathBuf::from("/tmp"));
    }
    let cmdlines: Vec<String> = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .map(|c| String::from_utf8_lossy(&c).into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut removed = 0;
    for base in bases {
        let Ok(entries) = std::fs::read_dir(&base) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("om-kernel-") {
                continue;
            }
            let old_enough = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= min_age);
            let owner_alive = name["om-kernel-".len()..]
                .split_once('-')
                .and_then(|(pid, _)| pid.parse::<u32>().ok())
                .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            let path = e.path();
            let needle = path.to_string_lossy().into_owned();
            if old_enough
                && !owner_alive
                && !cmdlines.iter().any(|c| c.contains(&needle))
                && std::fs::remove_dir_all(&path).is_ok()
            {
                removed += 1;
            }
        }
    }
    removed
}
