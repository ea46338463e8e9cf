"""om-worker's notebook kernel without a kernel application: ipykernel's shell, prepared once.

A Jupyter kernel started for one notebook spends most of its CPU setting itself up (ipykernel's
``IPKernelApp.initialize()``: traitlets configuration, the profile, the IPython shell with its
formatters, magics and display machinery, ZeroMQ sockets, heartbeat/IOPub/control threads) before
the first cell runs. None of that depends on the task. The fork server (``om_forkserver.py``)
therefore calls :func:`prepare` once, after its imports: it builds ipykernel's own kernel object
(``IPythonKernel`` with its ``ZMQInteractiveShell``, display publisher, display hook, comm manager),
configured as ``IPKernelApp`` configures it (config files of the profile, ``:memory:`` history,
interruptible pdb, ``sys.path``, extensions), but with **no sockets, no threads and no event loop**.
Each notebook run then gets a child forked from that state (:func:`serve`), which only connects to
om-worker, installs its output streams and runs the cells it is sent.

Messages are exactly ipykernel's: the kernel's own ``jupyter_client`` ``Session`` builds and
serialises them (headers, dates, ``json_clean``), the shell's display publisher / display hook /
``_showtraceback`` send ``display_data``, ``update_display_data``, ``clear_output``,
``execute_result`` and ``error``, and ``IPythonKernel.do_execute`` runs each cell (transformations,
``%magics``, ``!shell``, top-level ``await``, ``input()`` → ``StdinNotImplementedError``, payloads,
the reply). Only the transport differs: instead of five ZeroMQ sockets, the multipart frames go over
one Unix stream socket, each prefixed with its channel (``iopub``/``shell``/``control``)::

    frame   := u32le count, count * (u32le length, bytes)
    parts   := channel, "<IDS|MSG>", signature (empty: no key), header, parent_header,
               metadata, content, buffers...

om-worker (``src/kernel/client.rs``) decodes them with the same code as ZeroMQ frames.

What the child does that ipykernel's app would do differently:
- ``sys.stdout``/``sys.stderr`` are :class:`OutStream` objects of this module (buffered, flushed
  every 0.2 s, on ``flush()``, before displays and at the end of each cell, like ipykernel's); writes
  to file descriptors 1 and 2 (C extensions, ``os.system``, subprocesses) are captured as well and
  echoed to the original descriptors (ipykernel's ``capture_fd_output``) and, unlike ipykernel,
  drained before the cell's reply so they are never attributed to the next cell;
- one request at a time (om-worker sends one cell and waits for its reply), so there is no queue to
  abort after an error;
- interrupts are signals (SIGINT raises ``KeyboardInterrupt`` only while a request runs);
- ``shutdown_request`` ends the process at once: nothing in it outlives the run anyway.

Debugging: with ``OM_SHELL_DEBUG`` set in the kernel environment, SIGUSR1 makes a forked shell write
every thread's stack to its original stderr (om-worker's log).

Isolation is unchanged: the fork server never runs a task's cell (only :data:`WARM_UP`, after
which the namespace, output history and count are restored), so every child starts from the same
pristine shell (execution count 1, empty namespace, empty history) and one child runs one notebook.
Only the standard library, IPython, ipykernel and jupyter_client (ipykernel's dependency) are used.
"""

import asyncio
import codecs
import inspect
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading

DELIMITER = b"<IDS|MSG>"

#: largest frame part accepted from om-worker (requests are cell sources)
MAX_REQUEST_PART = 64 * 1024 * 1024

#: ipykernel's OutStream flush interval (seconds)
FLUSH_INTERVAL = 0.2

#: a stream buffer this large is sent at once instead of waiting for the interval
FLUSH_SIZE = 1 << 20

_U32 = struct.Struct("<I")


class Wire:
    """The socket to om-worker. Writes come from the main thread, the flusher thread and the fd
    capture threads, so each frame is written whole under a lock. Before :meth:`connect` (in the
    fork server) writes are dropped: nothing is sent before a child exists."""

    def __init__(self):
        self.sock = None
        self.lock = threading.Lock()
        self._rbuf = b""

    def connect(self, path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        self.sock = s

    def write(self, channel, parts):
        if self.sock is None:
            return
        chunks = [_U32.pack(len(parts) + 1), _U32.pack(len(channel)), channel]
        for p in parts:
            b = p if isinstance(p, bytes) else bytes(p)
            chunks.append(_U32.pack(len(b)))
            chunks.append(b)
        data = b"".join(chunks)
        with self.lock:
            self.sock.sendall(data)

    def _read_exact(self, n):
        while len(self._rbuf) < n:
            chunk = self.sock.recv(max(65536, n - len(self._rbuf)))
            if not chunk:
                return None
            self._rbuf += chunk
        out, self._rbuf = self._rbuf[:n], self._rbuf[n:]
        return out

    def read(self):
        """One frame's parts, or None when om-worker closed the socket."""
        head = self._read_exact(4)
        if head is None:
            return None
        (count,) = _U32.unpack(head)
        if count > 64:
            raise ValueError("frame of %d parts" % count)
        parts = []
        for _ in range(count):
            h = self._read_exact(4)
            if h is None:
                return None
            (n,) = _U32.unpack(h)
            if n > MAX_REQUEST_PART:
                raise ValueError("frame part of %d bytes" % n)
            p = self._read_exact(n)
            if p is None:
                return None
            parts.append(p)
        return parts


class Channel:
    """What ipykernel's ``Session.send`` writes to: anything with ``send_multipart``."""

    def __init__(self, wire, name):
        self.wire = wire
        self.name = name

    def send_multipart(self, parts, *args, **kwargs):
        self.wire.write(self.name, list(parts))


class OutStream:
    """``sys.stdout``/``sys.stderr`` of a forked shell: text is buffered and sent as ``stream``
    messages (parent = the running request) every :data:`FLUSH_INTERVAL`, when
    :data:`FLUSH_SIZE` is reached, on ``flush()`` and at the end of each cell -- what ipykernel's
    ``OutStream`` does, without its IOPub thread and ZeroMQ pipes."""

    encoding = "UTF-8"
    errors = "strict"
    newlines = None
    line_buffering = False

    def __init__(self, shell_io, name, fileno):
        self._io = shell_io
        self.name = name
        self._fileno = fileno
        self._lock = threading.Lock()  # the buffer (writers never wait for a send)
        self._send_lock = threading.Lock()  # one send at a time, in buffer order
        self._buf = []
        self._size = 0
        self._parent = {}
        self.topic = b"stream." + name.encode()

    # -- io.TextIOBase surface ------------------------------------------------------------
    def write(self, s):
        if not isinstance(s, str):
            raise TypeError("write() argument must be str, not %s" % type(s).__name__)
        if not s:
            return 0
        with self._lock:
            self._buf.append(s)
            self._size += len(s)
            big = self._size >= FLUSH_SIZE
        if big:
            self.flush()
        else:
            self._io.schedule_flush(self)
        return len(s)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        with self._send_lock:
            with self._lock:
                if not self._buf:
                    return
                text = "".join(self._buf)
                self._buf = []
                self._size = 0
                parent = self._parent
            self._io.session.send(
                self._io.iopub, "stream", {"name": self.name, "text": text}, parent=parent,
                ident=self.topic)

    def set_parent(self, parent):
        with self._lock:
            self._parent = parent

    @property
    def parent_header(self):
        return self._parent

    def fileno(self):
        return self._fileno

    def isatty(self):
        return False

    def readable(self):
        return False

    def writable(self):
        return True

    def seekable(self):
        return False

    def close(self):
        self.flush()

    @property
    def closed(self):
        return False

    def __repr__(self):
        return "<om_shell.OutStream %s>" % self.name


class ShellIO:
    """The child's output plumbing: the two streams, their flusher thread and the capture of file
    descriptors 1 and 2 (pipes read by one thread, drained before each reply)."""

    def __init__(self, session, iopub):
        self.session = session
        self.iopub = iopub
        self._cond = threading.Condition()
        self._pending = set()
        self._pipes = {}  # read fd -> (stream, incremental decoder, copy of the original fd)
        self._pipe_lock = threading.Lock()

    def install(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.stdout = OutStream(self, "stdout", 1)
        self.stderr = OutStream(self, "stderr", 2)
        for fd, stream in ((1, self.stdout), (2, self.stderr)):
            original = os.dup(fd)
            os.set_inheritable(original, False)
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            os.set_blocking(r, False)
            os.set_inheritable(r, False)
            self._pipes[r] = (stream, codecs.getincrementaldecoder("utf-8")("replace"), original)
        sys.stdout, sys.stderr = self.stdout, self.stderr
        for target, name in ((self._flusher, "om-shell-flush"), (self._capture, "om-shell-fd")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()

    def schedule_flush(self, stream):
        with self._cond:
            if stream not in self._pending:
                self._pending.add(stream)
                self._cond.notify()

    def _flusher(self):
        import time

        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
            time.sleep(FLUSH_INTERVAL)
            with self._cond:
                due, self._pending = self._pending, set()
            for stream in due:
                try:
                    stream.flush()
                except Exception:
                    pass

    def _read_pipes(self, fds):
        with self._pipe_lock:
            for fd in fds:
                stream, decoder, original = self._pipes[fd]
                while True:
                    try:
                        data = os.read(fd, 65536)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        data = b""
                    if not data:
                        break
                    text = decoder.decode(data)
                    if text:
                        stream.write(text)
                    # also where the process's fd pointed before (om-worker's log, escaped
                    # there), as ipykernel echoes what it captures to the original descriptor
                    try:
                        while data:
                            data = data[os.write(original, data):]
                    except OSError:
                        pass

    def _capture(self):
        fds = list(self._pipes)
        while True:
            try:
                ready, _, _ = select.select(fds, [], [])
            except InterruptedError:
                continue
            except OSError:
                return
            self._read_pipes(ready)

    def drain(self):
        """Everything written to fds 1/2 so far, then both streams, sent now."""
        self._read_pipes(list(self._pipes))
        for stream in (self.stdout, self.stderr):
            stream.flush()


class _NoSubshells:
    """``IPythonKernel.do_execute`` (ipykernel 7) compares the current thread with
    ``shell_channel_thread.parent_thread`` when it runs a cell with top-level ``await``; there is
    no shell-channel thread here (falsy: no subshells), and cells run on the main thread."""

    def __bool__(self):
        return False

    @property
    def parent_thread(self):
        return threading.main_thread()


class Prepared:
    """What :func:`prepare` built in the fork server (shared, copy-on-write, by every child)."""

    def __init__(self, app, kernel, wire):
        self.app = app
        self.kernel = kernel
        self.shell = kernel.shell
        self.session = kernel.session
        self.wire = wire
        self.iopub = kernel.iopub_socket
        self.shell_channel = Channel(wire, b"shell")
        self.control_channel = Channel(wire, b"control")
        self.exec_params = _accepted(kernel.do_execute, ("cell_meta", "cell_id"))
        self.init_code_in_child = True


def _accepted(func, names):
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return {n: False for n in names}
    return {n: n in params for n in names}


def prepare(argv=()):
    """Builds ipykernel's kernel object and shell the way ``IPKernelApp.initialize`` does, minus
    everything that opens a socket, starts a thread or runs code from the profile (startup files
    run in each child, as in a fresh kernel). Raises when this ipykernel cannot be driven this
    way; om-worker then forks full kernels instead."""
    from ipykernel import kernelapp
    from ipykernel.ipkernel import IPythonKernel

    # The application: argv and configuration files (ipython_kernel_config.py of the profile),
    # the profile dir, interruptible pdb -- what every kernel of this Python starts with.
    app = kernelapp.IPKernelApp.instance()
    # nbclient's history default, as om-worker passes it to every kernel it starts
    args = list(argv) + ["--HistoryManager.hist_file=:memory:"]
    super(kernelapp.IPKernelApp, app).initialize(args)
    app.init_pdb()
    app.init_path()

    from jupyter_client.session import Session

    wire = Wire()
    # A key only so that Session does not warn about unsigned messages; each child drops it (the
    # socket is private, 0700 dir, and om-worker checks the peer's pid), see serve().
    session = Session(parent=app, key=os.urandom(16).hex().encode())
    app.session = session
    iopub = Channel(wire, b"iopub")

    log = logging.getLogger("om_shell")
    log.propagate = False
    log.setLevel(logging.WARNING)
    if not log.handlers:
        log.addHandler(logging.StreamHandler(sys.__stderr__))

    kernel = IPythonKernel.instance(
        parent=app,
        session=session,
        iopub_socket=iopub,
        shell_stream=None,
        control_stream=None,
        stdin_socket=None,
        log=log,
        profile_dir=app.profile_dir,
        user_ns=app.user_ns,
    )
    try:
        kernel.shell_channel_thread = _NoSubshells()
    except Exception:  # ipykernel 6: no such trait, and nothing reads it
        pass
    app.kernel = kernel
    app.init_shell()
    shell = app.shell
    if shell is None:
        raise RuntimeError("ipykernel built no shell")
    # sys.displayhook outside the shell's own (code run with exec in 'single' mode)
    try:
        from ipykernel.displayhook import ZMQDisplayHook

        app.displayhook = ZMQDisplayHook(session, iopub)
        app.displayhook.get_execution_count = lambda: kernel.execution_count
    except Exception:
        app.displayhook = None
    # the extensions configured for the profile (IPython's storemagic by default)
    try:
        app.init_extensions()
    except Exception as e:
        log.warning("om_shell: extensions not loaded: %s", e)
    prepared = Prepared(app, kernel, wire)
    _warm_up(prepared)
    # Startup code (exec_lines, startup files, PYTHONSTARTUP) runs in each child, as in each fresh
    # kernel; when none is configured, what init_code does besides (hiding the initial names from
    # %who, the sys.modules snapshot %reset uses) is the same for every child: done here once.
    prepared.init_code_in_child = _startup_code_configured(app)
    if not prepared.init_code_in_child:
        app.init_code()
    return prepared


def _startup_code_configured(app):
    """True when ``app.init_code()`` would run any code (IPython's own rules)."""
    if app.exec_lines or app.exec_files or getattr(app, "code_to_run", "") or \
            getattr(app, "module_to_run", "") or getattr(app, "file_to_run", ""):
        return True
    if getattr(app, "exec_PYTHONSTARTUP", False) and os.environ.get("PYTHONSTARTUP"):
        return True
    try:
        import glob
        from itertools import chain

        from IPython.core import shellapp

        dirs = [app.profile_dir.startup_dir] + [
            os.path.join(d, "startup")
            for d in chain(shellapp.ENV_CONFIG_DIRS, shellapp.SYSTEM_CONFIG_DIRS)]
        return any(glob.glob(os.path.join(d, "*.py")) or glob.glob(os.path.join(d, "*.ipy"))
                   for d in dirs)
    except Exception:  # cannot tell: run it in the child, as a kernel would
        return True


#: what the server runs through the shell once, so that the first cell of every child does not
#: pay for first-use initialisation (lazy imports, compiled patterns, formatter setup): no
#: user code, nothing stored in the history, the namespace restored afterwards
WARM_UP = ("pass", "1")


def _warm_up(p):
    shell = p.shell
    hm = shell.history_manager
    dh = shell.displayhook
    saved_ns = dict(shell.user_ns)
    saved = {
        "dh": (getattr(dh, "_", ""), getattr(dh, "__", ""), getattr(dh, "___", "")),
        "out": dict(hm.output_hist),
        "reprs": dict(getattr(hm, "output_hist_reprs", {})),
        "result": getattr(shell, "last_execution_result", None),
        "succeeded": getattr(shell, "last_execution_succeeded", True),
        "count": shell.execution_count,
    }
    loop = asyncio.new_event_loop()
    try:
        for code in WARM_UP:
            reply = p.kernel.do_execute(code, False, store_history=False)
            if inspect.isawaitable(reply):
                reply = loop.run_until_complete(reply)
            if reply.get("status") != "ok":
                raise RuntimeError("warm-up cell %r failed: %s" % (code, reply.get("evalue")))
    finally:
        loop.close()
        asyncio.set_event_loop(None)
    # everything as a kernel that never ran a cell has it
    shell.user_ns.clear()
    shell.user_ns.update(saved_ns)
    dh._, dh.__, dh.___ = saved["dh"]
    hm.output_hist.clear()
    hm.output_hist.update(saved["out"])
    if hasattr(hm, "output_hist_reprs"):
        hm.output_hist_reprs.clear()
        hm.output_hist_reprs.update(saved["reprs"])
    shell.last_execution_result = saved["result"]
    shell.last_execution_succeeded = saved["succeeded"]
    if shell.execution_count != saved["count"]:
        raise RuntimeError("warm-up changed the execution count")
    shell.payload_manager.clear_payload()


def _send(p, channel, msg_type, content, parent, ident=None, metadata=None):
    return p.session.send(channel, msg_type, content, parent=parent, ident=ident,
                          metadata=metadata)


def _status(p, state, parent):
    _send(p, p.iopub, "status", {"execution_state": state}, parent,
          ident=p.kernel._topic("status"))


def _set_parent(p, parent):
    try:
        p.kernel.set_parent([], parent, "shell")
    except TypeError:  # older signature
        p.kernel.set_parent([], parent)
    p.shell.set_parent(parent)
    for s in (sys.stdout, sys.stderr):
        if hasattr(s, "set_parent"):
            s.set_parent(parent)


def _execute(p, loop, io, parent):
    from ipykernel.jsonutil import json_clean

    content = parent.get("content") or {}
    code = content.get("code", "")
    silent = bool(content.get("silent", False))
    store_history = content.get("store_history", not silent)
    user_expressions = content.get("user_expressions") or {}
    allow_stdin = False  # no stdin channel: input() raises StdinNotImplementedError
    kernel = p.kernel
    metadata = kernel.init_metadata(parent)
    if not silent:
        kernel.execution_count += 1
        kernel._publish_execute_input(code, parent, kernel.execution_count)
    args = {"code": code, "silent": silent, "store_history": store_history,
            "user_expressions": user_expressions, "allow_stdin": allow_stdin}
    cell_meta = parent.get("metadata") or {}
    if p.exec_params["cell_meta"]:
        args["cell_meta"] = cell_meta
    if p.exec_params["cell_id"]:
        args["cell_id"] = cell_meta.get("cellId") if isinstance(cell_meta, dict) else None
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        reply = kernel.do_execute(**args)
        if inspect.isawaitable(reply):
            reply = loop.run_until_complete(reply)
    except KeyboardInterrupt:
        # the interrupt came outside the cell's code (IPython reports it inside)
        reply = {"status": "error", "ename": "KeyboardInterrupt", "evalue": "", "traceback": [],
                 "execution_count": p.shell.execution_count - 1, "user_expressions": {},
                 "payload": []}
    finally:
        signal.signal(signal.SIGINT, previous)
    io.drain()
    reply = json_clean(reply)
    metadata = kernel.finish_metadata(parent, metadata, reply)
    _send(p, p.shell_channel, "execute_reply", reply, parent, metadata=metadata)


def serve(p, req):
    """The forked child: connects to om-worker's socket ``req['socket']`` and runs requests until
    ``shutdown_request`` or until om-worker closes the socket. Never returns."""
    p.wire.connect(req["socket"])
    # this process sends now (Session refuses to send from a process other than its creator's)
    p.session.pid = os.getpid()
    p.session.key = b""
    # the kernel's own log lines go where om-worker logs the child's stderr, not into the notebook
    # (ipykernel reroutes its log handler to the original stderr the same way)
    diag_fd = os.dup(2)
    os.set_inheritable(diag_fd, False)
    diag = os.fdopen(diag_fd, "w", buffering=1, errors="backslashreplace")
    if os.environ.get("OM_SHELL_DEBUG"):
        import faulthandler
        faulthandler.register(signal.SIGUSR1, file=diag, all_threads=True)
    for log in (p.kernel.log, getattr(p.app, "log", None)):
        for h in getattr(log, "handlers", ()):
            if isinstance(h, logging.StreamHandler):
                h.setStream(diag)
    kernel, shell = p.kernel, p.shell
    # the environment a kernel app sets up (the request's env replaced the server's)
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    try:
        shell.init_environment()
    except Exception:
        pass
    io = ShellIO(p.session, p.iopub)
    io.install()
    if p.app.displayhook is not None:
        sys.displayhook = p.app.displayhook
    # idle: SIGINT ignored (ipykernel's init_signal); only a running request is interrupted
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    kernel._stdout, kernel._stderr = sys.stdout, sys.stderr
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # exec_lines / exec_files / startup files of the profile, as each fresh kernel runs them
    if p.init_code_in_child:
        try:
            p.app.init_code()
        except Exception:
            pass
    io.drain()
    session = p.session
    while True:
        parts = p.wire.read()
        if parts is None:
            os._exit(0)
        if len(parts) < 2:
            continue
        channel = parts[0]
        try:
            idents, msg_list = session.feed_identities(parts[1:], copy=True)
            msg = session.deserialize(msg_list, content=True, copy=True)
        except Exception as e:
            diag.write("om_shell: bad request: %r\n" % (e,))
            continue
        msg_type = msg.get("header", {}).get("msg_type")
        reply_to = p.control_channel if channel == b"control" else p.shell_channel
        _status(p, "busy", msg)
        _set_parent(p, msg)
        if msg_type == "execute_request":
            _execute(p, loop, io, msg)
        elif msg_type == "kernel_info_request":
            content = {"status": "ok"}
            content.update(kernel.kernel_info)
            _send(p, reply_to, "kernel_info_reply", content, msg)
        elif msg_type == "shutdown_request":
            content = msg.get("content") or {}
            io.drain()
            _send(p, reply_to, "shutdown_reply",
                  {"status": "ok", "restart": bool(content.get("restart", False))}, msg)
            _status(p, "idle", msg)
            os._exit(0)
        else:
            _send(p, reply_to, (msg_type or "unknown").replace("_request", "_reply"),
                  {"status": "error", "ename": "NotImplementedError",
                   "evalue": "om-worker's shell does not handle %s" % msg_type,
                   "traceback": []}, msg)
        io.drain()
        _status(p, "idle", msg)
