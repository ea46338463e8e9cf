"""om-worker fork server: notebook kernels and omega|ml task processes.

Started once per worker with the kernel's Python (same interpreter options as the kernelspec),
with the exact environment and working directory the worker gives its kernels. It imports
ipykernel's kernel app and a preload list (default ``omegaml`` and the omegaml submodules its
lazy ``setup()`` imports: pandas, scikit-learn, celery, ...) once, then forks one child per
request. Each child becomes a fresh IPython kernel in ~tens of ms instead of paying the ~3
CPU-seconds of imports again, or runs one omega|ml Celery task (``om_taskrunner.py``) and exits.

For omega|ml task children the server also runs ``om_taskrunner.preload_for_fork()`` once after
the preload list (only when ``omegaml`` was preloaded): ``omegaml.celeryapp`` imported, the Celery
app finalized and its loader's worker init done (as in the Python worker's parent process), the
modules the model tasks import lazily, libc's ``prctl`` resolved; it leaves no omega|ml instance
behind (the default one ``omegaml.celeryapp`` builds for its defaults is reset) and opens nothing.
Its result is the ready event's ``preload["om_taskrunner.preload_for_fork"]``. A task child then
starts at the task: ~0.1 CPU-s less per task.

Why this is safe (isolation):
- every kernel is a new process forked from a pristine parent that never runs user code, never
  creates an omega|ml client (``omegaml`` builds its ``Omega`` instance lazily on first
  attribute access; nothing here touches ``om.datasets`` & co.), opens no database or broker
  connection, creates no ZeroMQ context and runs no extra threads. State one task creates
  (variables, module attributes, ``os.environ``, files descriptors) lives only in that task's
  child and dies with it;
- the child calls ``setsid()`` (own session and process group, so om-worker can ``killpg`` it
  and everything it spawns), becomes the subreaper of its tree, resets signal handlers, reseeds ``random`` (and numpy's legacy
  global generator when numpy is loaded), closes the server's descriptors, applies env/cwd, and
  only then creates the kernel app: its ZeroMQ context and sockets are created after the fork.

Protocol (JSON lines): requests on stdin, replies and events on the original stdout (which is
duplicated to a private descriptor; fd 1 is pointed at stderr so that module imports or kernels
printing to stdout cannot corrupt the protocol).

  -> {"op": "fork", "id": N, "argv": [...kernel app args...], "env": {...}, "cwd": "..."|null,
      "rlimit_as": bytes|null}
  <- {"event": "forked", "id": N, "pid": P}  |  {"event": "error", "id": N, "error": "..."}
  -> {"op": "task", "id": N, "request": "<path of the task request JSON>", "env": {...},
      "cwd": "..."|null, "rlimit_as": bytes|null}
  <- {"event": "forked", "id": N, "pid": P}  |  {"event": "error", "id": N, "error": "..."}
     (the child runs one omega|ml Celery task: ``om_taskrunner.run_file(request)``, see
     om_taskrunner.py for the request and the outcome files; one child per task, never reused)
  -> {"op": "spare", "id": N, "hostname": "...", "env": {...}, "cwd": "..."|null,
      "rlimit_as": bytes|null}
  <- {"event": "forked", "id": N, "pid": P}  |  {"event": "error", "id": N, "error": "..."}
     (a task child forked ahead of its task: it prepares itself as for ``task`` and then runs
     ``om_taskrunner.warm_up(hostname)`` -- Celery's worker-process init, the default omega|ml
     instance and its MongoDB connection -- and waits on a pipe only the server holds; it has never
     run a task. Unused, it exits 0 when the server exits or closes its pipe.)
  -> {"op": "go", "id": N, "pid": P, "request": "<path of the task request JSON>"}
  <- {"event": "started", "id": N, "pid": P}  |  {"event": "error", "id": N, "error": "..."}
     (spare P runs that one task, then exits as a ``task`` child; a spare that died meanwhile,
     or a pid that is not a waiting spare, is an error and nothing runs)
  -> {"op": "retire", "id": N, "pid": P}     (spare P's pipe closed: it exits 0; no reply)
  -> {"op": "ping", "id": N}                 <- {"event": "pong", "id": N}
  <- {"event": "ready", "pid": ..., "preload": {"mod": null | "error text"}, "warnings": [...],
      "task_runner": null | "error text"}    (null: the `task` op is available)
  <- {"event": "exit", "pid": P, "code": C} | {"event": "exit", "pid": P, "signal": S}
     (both with "cpu_s": user+system CPU seconds and "maxrss_kb" of the child, from wait4)
  <- {"event": "fatal", "error": "..."}       (then exit status 2: ipykernel itself unusable)

Kernel and task children share the same preparation (``_prepare_child``): ``setsid()``, default
signal handlers, the server's descriptors closed, stdin from /dev/null, env/cwd/RLIMIT_AS applied,
generators reseeded. A task child exits 0 once it has written its outcome (1: it could not write
it, 2: unusable request); its ``exit`` event is reported as for kernels.

Lifetime: the server exits when its stdin reaches EOF (om-worker exited or dropped the server),
on SIGTERM/SIGHUP, or when its parent changes; before exiting it SIGKILLs the process groups of
all its live children. A child does not end with the server, though: a task can kill the server
(``os.kill(os.getppid(), 9)``), and the tasks of the other slots must run on. Every child instead
watches om-worker (the server's parent, ``_watch_owner``: a pidfd, or a 1 s poll when a task closed
it) and SIGKILLs its own process group when om-worker is gone; kernels get no ipykernel parent
poller (``parent_handle=1``). om-worker watches children that outlived their server until they
end, and starts a new server for the next task.

Nothing a task starts outlives it: each child is the subreaper of its own tree
(``PR_SET_CHILD_SUBREAPER``), so what a task orphans -- ``start_new_session`` daemons, double
forks -- stays below it, where om-worker's kill at the end of the task finds it (a tree walk, not
only the process group); when the task's own process died first, its orphans are re-parented to the
server (a subreaper too), which SIGKILLs every child it did not fork (``_kill_adopted``, on every
SIGCHLD and at least once a second).

Only the standard library and ipykernel are used (the task child also uses the preloaded
omegaml/celery/kombu through om_taskrunner.py, loaded from this script's directory).
"""

import errno
import gc
import importlib
import json
import os
import select
import signal
import sys
import threading
import time
import traceback

# The omegaml submodules that ``om.runtime`` / ``om.jobs`` (the generated init cell) import via
# omegaml's lazy setup: importing them is side-effect free (no client, no connection) and is
# where most of the ~3 CPU-s of a fresh kernel go.
DEFAULT_PRELOAD = [
    "omegaml",
    "omegaml.omega",
    "omegaml.runtimes",
    "omegaml.notebook.jobs",
    "omegaml.notebook.tasks",
    "omegaml.backends.scikitlearn",
    "omegaml.backends.package",
    "omegaml.backends.tracking",
    "omegaml.backends.repository",
    "omegaml.backends.sqlalchemy",
    "omegaml.store.streams",
    "omegaml.mdataframe",
    "omegaml.tasks",
    "omegaml.celery_util",
    "omegaml.client",
]

# What IPKernelApp.initialize() would import in every child (debugpy alone is ~150 ms): imported
# once here, best effort. None of them starts a thread or creates a ZeroMQ context on import.
KERNEL_MODULES = [
    "ipykernel.ipkernel",
    "ipykernel.zmqshell",
    "ipykernel.debugger",
    "IPython.core.oinspect",
    "IPython.core.completerlib",
    "IPython.core.debugger",
    "sqlite3",
    "pdb",
    "tornado.platform.asyncio",
]

# The key of the task preload (``om_taskrunner.preload_for_fork``) in the ready event's "preload".
TASK_PRELOAD = "om_taskrunner.preload_for_fork"

_PR_SET_CHILD_SUBREAPER = 36
_prctl = None  # libc's prctl (resolved once in main(), before any fork)
_owner = None  # pid of the process that started the server (om-worker); children end with it

_children = {}  # pid -> True while not reaped
_spares = {}  # pid of a waiting spare task child -> the write end of its go pipe (only we hold it)

#: longest request path a spare accepts on its go pipe
_MAX_GO = 1 << 16
_stop = False


def _write(fd, obj):
    data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    while data:
        try:
            n = os.write(fd, data)
        except InterruptedError:
            continue
        data = data[n:]


def _parse_args(argv):
    preload = list(DEFAULT_PRELOAD)
    no_default = False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--no-default-preload":
            no_default = True
        elif a == "--preload" and i + 1 < len(argv):
            i += 1
            preload.extend(m.strip() for m in argv[i].split(",") if m.strip())
        elif a.startswith("--preload="):
            preload.extend(m.strip() for m in a.split("=", 1)[1].split(",") if m.strip())
        i += 1
    if no_default:
        preload = [m for m in preload[len(DEFAULT_PRELOAD):]]
    seen = set()
    return [m for m in preload if not (m in seen or seen.add(m))]


def _socket_fds():
    """Descriptors that are sockets (there must be none: no connection before fork)."""
    out = []
    try:
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.readlink("/proc/self/fd/" + name).startswith("socket:"):
                    out.append(int(name))
            except OSError:
                pass
    except OSError:
        pass
    return out


def _reseed():
    import random

    random.seed()
    np = sys.modules.get("numpy")
    if np is not None:
        try:
            np.random.seed()
        except Exception:  # pragma: no cover - numpy without legacy RNG
            pass


def _subreaper():
    """Makes this process the subreaper of its descendants: what they orphan (double forks,
    ``start_new_session`` daemons) is re-parented here instead of to init, so it stays findable
    (a task's process tree) and killable. Best effort (False: no prctl)."""
    if _prctl is None:
        return False
    try:
        return _prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except Exception:
        return False


def _watch_owner(owner):
    """Ends this child's process group when ``owner`` (om-worker) is gone, whoever its parent is
    by then: a child survives its fork server (a task may kill the server; the other slots' tasks
    run on), never the worker. A pidfd when available (no polling), else a 1 s /proc poll."""
    if not owner or owner <= 1:
        return

    def gone():
        try:
            # everything below this child first (it is their subreaper, whatever session or group
            # they moved to), then its own group
            todo, seen = [os.getpid()], set()
            while todo:
                pid = todo.pop()
                try:
                    tids = os.listdir("/proc/%d/task" % pid)
                except OSError:
                    continue
                for tid in tids:
                    try:
                        with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                            kids = [int(k) for k in f.read().split()]
                    except (OSError, ValueError):
                        continue
                    for k in kids:
                        if k not in seen:
                            seen.add(k)
                            todo.append(k)
            for k in seen:
                try:
                    os.kill(k, signal.SIGKILL)
                except OSError:
                    pass
            os.killpg(0, signal.SIGKILL)
        finally:
            os._exit(1)

    def run():
        fd = None
        try:
            fd = os.pidfd_open(owner)
        except ProcessLookupError:
            gone()
        except (AttributeError, OSError):
            fd = None
        while True:
            if fd is not None:
                try:
                    select.select([fd], [], [])
                    gone()
                except (OSError, ValueError):  # the task closed our descriptor: poll instead
                    fd = None
            elif not os.path.exists("/proc/%d" % owner):
                gone()
            else:
                time.sleep(1.0)

    # a small stack: RLIMIT_AS (--kernel-memory-mb) counts every thread's stack reservation
    try:
        old = threading.stack_size(256 * 1024)
    except (ValueError, RuntimeError):
        old = None
    try:
        threading.Thread(target=run, name="om-owner-watch", daemon=True).start()
    finally:
        if old is not None:
            threading.stack_size(old)


def _prepare_child(req, close_fds):
    """What every forked child (kernel or task) does first: own session, subreaper of its own
    tree, ends with om-worker (not with the server), default signals, the server's descriptors
    closed, stdin from /dev/null, the request's env/cwd/RLIMIT_AS, reseeded random generators."""
    os.setsid()
    _subreaper()
    _watch_owner(_owner)
    signal.set_wakeup_fd(-1)
    for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # CPython's own startup default
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    env = req.get("env")
    if isinstance(env, dict):
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in env.items()})
    cwd = req.get("cwd")
    if cwd:
        os.chdir(cwd)
    limit = req.get("rlimit_as")
    if isinstance(limit, int) and limit > 0:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _reseed()


def _run_child(req, close_fds, body):
    """Runs in the forked child; never returns. ``body(req)`` returns the exit status."""
    code = 1
    try:
        _prepare_child(req, close_fds)
        code = body(req)
        if not isinstance(code, int):
            code = 0 if code is None else 1
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            code = 1
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:
            pass
        code = 1
    finally:
        try:
            import atexit

            atexit._run_exitfuncs()
        except BaseException:
            pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(code & 0xFF if code >= 0 else 1)


# What one output may cost om-worker: without a bound, one print('x' * 500_000_000) crosses the
# socket as one message and om-worker holds all of it before its per-cell cap (10 MiB) applies.
# A kernel sends at most _MAX_OUTPUT_MESSAGE characters of one output (a longer text keeps its
# start and a note; a larger mime bundle or traceback becomes a notice), and a long stream text
# goes out in pieces of _OUTPUT_PIECE characters, so om-worker never receives a large frame from
# an ordinary print. om-worker still cuts whatever arrives larger (a kernel can bypass this).
_MAX_OUTPUT_MESSAGE = 16 * 1024 * 1024
_OUTPUT_PIECE = 2 * 1024 * 1024
_OUTPUT_TYPES = ("stream", "display_data", "execute_result", "update_display_data", "error")


def _cap_output_messages(session):
    send = session.send
    cap, piece = _MAX_OUTPUT_MESSAGE, _OUTPUT_PIECE

    def _size(v):
        if isinstance(v, str):
            return len(v)
        if isinstance(v, dict):
            return sum(len(str(k)) + _size(x) for k, x in v.items())
        if isinstance(v, (list, tuple)):
            return sum(_size(x) for x in v)
        return 16

    def capped(msg_type, content):
        if msg_type not in _OUTPUT_TYPES or not isinstance(content, dict) or _size(content) <= cap:
            return content
        content = dict(content)
        for key, value in list(content.items()):
            if isinstance(value, str) and len(value) > cap:
                content[key] = value[:cap] + (
                    "\n... [om-worker: %s %s of %d characters cut to its first %d]\n"
                    % (msg_type, key, len(value), cap))
            elif key in ("data", "traceback") and _size(value) > cap:
                note = ("[om-worker: %s %s of about %d characters omitted: over the %d-byte"
                        " message limit]" % (msg_type, key, _size(value), cap))
                content[key] = {"text/plain": note} if key == "data" else [note]
        return content

    def pieces(content):
        text = content.get("text")
        if not isinstance(text, str) or len(text) <= piece:
            return [content]
        return [dict(content, text=text[i:i + piece]) for i in range(0, len(text), piece)]

    def capped_send(stream, msg_or_type, content=None, *args, **kwargs):
        # OutStream sends a built message (dict), the display publisher and the kernel a type
        try:
            if isinstance(msg_or_type, dict):
                msg_type, old = msg_or_type.get("msg_type"), msg_or_type.get("content")
                new = capped(msg_type, old)
                if msg_type == "stream" and isinstance(new, dict):
                    parts = pieces(new)
                    if len(parts) > 1:
                        parent = msg_or_type.get("parent_header")
                        for part in parts[:-1]:
                            send(stream, session.msg("stream", part, parent=parent), content,
                                 *args, **kwargs)
                        new = parts[-1]
                if new is not old:
                    msg_or_type = dict(msg_or_type, content=new)
            else:
                content = capped(msg_or_type, content)
                if msg_or_type == "stream" and isinstance(content, dict):
                    parts = pieces(content)
                    for part in parts[:-1]:
                        send(stream, msg_or_type, part, *args, **kwargs)
                    content = parts[-1]
        except Exception:
            pass
        return send(stream, msg_or_type, content, *args, **kwargs)

    session.send = capped_send


def _clear_shell_singletons():
    """Forgets what a failed ``om_shell.prepare`` may have left in the server (the kernel app,
    kernel and shell singletons, ipykernel's comm manager): a forked kernel app builds its own."""
    try:
        from ipykernel import ipkernel, kernelapp
        from IPython.core.interactiveshell import InteractiveShell

        for cls in (kernelapp.IPKernelApp, ipkernel.IPythonKernel, InteractiveShell):
            if cls.initialized():
                cls.clear_instance()
        if getattr(ipkernel, "_comm_manager", None) is not None:
            ipkernel._comm_manager = None
    except Exception:
        pass


def _kernel_body(launcher_file):
    def body(req):
        os.environ["JPY_PARENT_PID"] = str(_owner or os.getppid())
        args = [str(a) for a in req.get("argv") or []]
        # no parent poller: the kernel outlives its fork server (see _watch_owner, which ends it
        # with om-worker); 1 also keeps ipykernel from printing its connection banner
        args.append("--IPKernelApp.parent_handle=1")
        sys.argv = [launcher_file] + args
        from ipykernel import kernelapp

        _clear_shell_singletons()

        app = kernelapp.IPKernelApp.instance()
        app.initialize(args)
        _cap_output_messages(app.session)
        app.start()
        return 0

    return body


def _task_body(runner):
    def body(req):
        # ends with om-worker through _watch_owner, not with the fork server (Celery's pool
        # children get PR_SET_PDEATHSIG for their worker, which is their parent; ours is not)
        runner.OWNER_WATCHED = True
        sys.argv = [getattr(runner, "__file__", None) or "om_taskrunner"]
        # no IPython shell in a task (the server prepared one for notebooks): `get_ipython()` is
        # None, as in a Celery pool child (omega|ml's is_interactive(), tqdm.auto, ...)
        _clear_shell_singletons()
        code = runner.run_file(req["request"])
        # The outcome is written and every MongoDB write of the task acknowledged: what atexit
        # would run now (pymongo's monitor threads, omega|ml's close_all_clients) only keeps the
        # task's slot busy for ~0.3 s. om-worker ends the child's process group right after.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(code & 0xFF if isinstance(code, int) and code >= 0 else 1)

    return body


def _read_go(fd):
    """The request path the server sends a spare, or None when its pipe closed first."""
    data = b""
    while b"\n" not in data and len(data) < _MAX_GO:
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            return None
        data += chunk
    line = data.split(b"\n", 1)[0]
    return os.fsdecode(line) if line else None


def _spare_body(runner, go_fd):
    """A task child forked ahead of its task: the part of every task that does not depend on the
    task (``om_taskrunner.warm_up``) runs now, then it waits for its one request."""
    task_body = _task_body(runner)

    def body(req):
        sys.argv = [getattr(runner, "__file__", None) or "om_taskrunner"]
        runner.OWNER_WATCHED = True  # see _task_body
        _clear_shell_singletons()  # see _task_body
        try:
            runner.warm_up(req.get("hostname") if isinstance(req.get("hostname"), str) else None)
        except BaseException:  # the task does it itself, as a cold child would
            traceback.print_exc()
        path = _read_go(go_fd)
        os.close(go_fd)
        if path is None:
            # never used (the server exits or retired it): nothing to flush or clean up
            os._exit(0)
        return task_body({"request": path})

    return body


def _load_sibling(name):
    """``<name>.py`` from this script's directory (sys.path[0] is dropped in main())."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _shell_body(prepared, launcher_file):
    """A notebook kernel without a kernel app: the shell ``om_shell.prepare`` built before the
    fork runs the cells om-worker sends over the request's socket (see om_shell.py)."""
    import om_shell

    def body(req):
        os.environ["JPY_PARENT_PID"] = str(_owner or os.getppid())
        # what a kernel's cells see as sys.argv[0] (there is no connection file to pass)
        sys.argv = [launcher_file]
        om_shell.serve(prepared, req)
        return 0

    return body


def _reap(out_fd):
    while True:
        try:
            pid, status, ru = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        if pid == 0:
            return
        if _children.pop(pid, None) is None:
            continue  # an adopted orphan of some task (see _kill_adopted)
        go = _spares.pop(pid, None)
        if go is not None:
            os.close(go)
        usage = {"cpu_s": round(ru.ru_utime + ru.ru_stime, 6), "maxrss_kb": ru.ru_maxrss}
        if os.WIFSIGNALED(status):
            _write(out_fd, {"event": "exit", "pid": pid, "signal": os.WTERMSIG(status), **usage})
        elif os.WIFEXITED(status):
            _write(out_fd, {"event": "exit", "pid": pid, "code": os.WEXITSTATUS(status), **usage})


def _go(out_fd, rid, req):
    """``go``: hands a waiting spare its request path; the spare then runs that task."""
    pid = req.get("pid")
    path = req.get("request")
    if not isinstance(path, str) or not path or "\n" in path:
        _write(out_fd, {"event": "error", "id": rid, "error": "go: 'request' must be a file path"})
        return
    go = _spares.pop(pid, None) if isinstance(pid, int) else None
    if go is None:
        _write(out_fd, {"event": "error", "id": rid, "error": "go: no waiting spare %r" % (pid,)})
        return
    data = (os.path.abspath(path) + "\n").encode()
    try:
        while data:
            try:
                data = data[os.write(go, data):]
            except InterruptedError:
                continue
    except OSError as e:  # the spare died since (its exit event follows)
        _write(out_fd, {"event": "error", "id": rid, "error": "go: spare %d is gone: %s" % (pid, e)})
        return
    finally:
        os.close(go)
    _write(out_fd, {"event": "started", "id": rid, "pid": pid})


def _kill_adopted():
    """SIGKILLs every child of the server it did not fork: processes a task left behind after its
    own process had ended (re-parented here, the server being their subreaper). A task's
    processes end with the task."""
    try:
        with open("/proc/self/task/%d/children" % os.getpid()) as f:
            pids = [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return
    for pid in pids:
        if pid not in _children:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _on_term(signum, frame):
    global _stop
    _stop = True


def main():
    # This script's directory is sys.path[0]; `python -m ipykernel_launcher` also removes its
    # own first entry (the cwd) before IPython adds '' back, so drop ours to match.
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]
    preload = _parse_args(sys.argv[1:])
    runner, runner_error = None, None
    try:
        runner = _load_sibling("om_taskrunner")
    except BaseException as e:  # kernels still work; `task` requests get an error event
        runner_error = "%s: %s" % (type(e).__name__, e)

    # Private protocol descriptor; fd 1 now goes to stderr.
    out_fd = os.dup(1)
    os.set_inheritable(out_fd, False)
    os.dup2(2, 1)
    parent = os.getppid()
    global _owner, _prctl
    _owner = parent
    try:
        import ctypes

        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        _prctl = None
    _subreaper()

    try:
        from ipykernel import kernelapp  # noqa: F401  (the part every kernel needs)
        import ipykernel_launcher

        launcher_file = getattr(ipykernel_launcher, "__file__", None) or "ipykernel_launcher"
    except BaseException as e:
        _write(out_fd, {"event": "fatal", "error": "cannot import ipykernel: %r" % (e,)})
        sys.exit(2)

    # debugpy warns about frozen modules once per process on import; the server's stderr is
    # om-worker's log (children get their own environment from each request, so this is not seen
    # by any task)
    quiet = "PYDEVD_DISABLE_FILE_VALIDATION" not in os.environ
    if quiet:
        os.environ["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    for mod in KERNEL_MODULES:
        try:
            importlib.import_module(mod)
        except BaseException:  # the child imports it itself, as a plain kernel would
            pass
    if quiet:
        os.environ.pop("PYDEVD_DISABLE_FILE_VALIDATION", None)

    kernel_body = _kernel_body(launcher_file)
    task_body = _task_body(runner)

    results = {}
    for mod in preload:
        try:
            importlib.import_module(mod)
            results[mod] = None
        except BaseException as e:  # reported, not fatal
            results[mod] = "%s: %s" % (type(e).__name__, e)

    if runner is not None and "omegaml" in results and results["omegaml"] is None:
        # omega|ml tasks: the Celery app loaded and finalized, the modules the tasks import lazily,
        # libc's prctl, so that a task child starts at the task (om_taskrunner.preload_for_fork;
        # opens no connection, leaves no omega|ml instance; checked below like the preload list)
        try:
            failed = {m: e for m, e in runner.preload_for_fork().items() if e}
            if failed:  # optional modules: the task imports them itself
                sys.stderr.write("om_forkserver: task modules not preloaded: %s\n" % failed)
            results[TASK_PRELOAD] = None
        except BaseException as e:  # tasks still run, loading the app themselves
            results[TASK_PRELOAD] = "%s: %s" % (type(e).__name__, e)

    # Notebook kernels without a kernel app (om_shell.py): ipykernel's kernel object and shell,
    # built once here; the `shell` op forks a child that only connects and runs cells.
    shell_body, shell_error = None, "not requested (--no-shell)"
    if "--no-shell" not in sys.argv[1:]:
        try:
            om_shell = _load_sibling("om_shell")
            prepared = om_shell.prepare()
            _cap_output_messages(prepared.session)
            shell_body, shell_error = _shell_body(prepared, launcher_file), None
        except BaseException as e:  # kernels are then forked as full ipykernel apps (`fork`)
            shell_error = "%s: %s" % (type(e).__name__, e)
            try:
                traceback.print_exc()
            except BaseException:
                pass

    warnings = []
    if threading.active_count() > 1:
        warnings.append(
            "preloading started threads (%s); forking is still done but is less safe"
            % ", ".join(t.name for t in threading.enumerate())
        )
    zmq = sys.modules.get("zmq")
    if zmq is not None and getattr(zmq.Context, "_instance", None) is not None:
        warnings.append("a ZeroMQ context exists before fork")
    socks = _socket_fds()
    if socks:
        warnings.append("socket descriptors open before fork: %s" % socks)
    omegaml = sys.modules.get("omegaml")
    if omegaml is not None:
        om_inst = getattr(getattr(omegaml, "_omega", None), "_om", None)
        if getattr(om_inst, "initialized", False):
            warnings.append("an omega|ml instance was created before fork")

    # Everything above lives as long as the server: moved out of the collector's generations, a
    # child's garbage collections never walk (and so never copy-on-write) the ~hundreds of MB of
    # preloaded objects; only what the task itself allocates is collected.
    gc.freeze()

    rfd, wfd = os.pipe()
    for fd in (rfd, wfd):
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
    signal.set_wakeup_fd(wfd)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # om-worker's Ctrl-C is handled by om-worker

    _write(
        out_fd,
        {"event": "ready", "pid": os.getpid(), "preload": results, "warnings": warnings,
         "task_runner": runner_error, "shell": shell_error},
    )

    buf = b""
    try:
        while not _stop:
            try:
                readable, _, _ = select.select([0, rfd], [], [], 1.0)
            except InterruptedError:
                readable = []
            if rfd in readable:
                try:
                    while os.read(rfd, 4096):
                        pass
                except BlockingIOError:
                    pass
            _reap(out_fd)
            _kill_adopted()
            if os.getppid() != parent:
                break
            if 0 not in readable:
                continue
            try:
                data = os.read(0, 1 << 16)
            except InterruptedError:
                continue
            if not data:
                break  # om-worker is gone (or dropped us)
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("request is not an object")
                except ValueError as e:
                    _write(out_fd, {"event": "error", "id": None, "error": "bad request: %s" % e})
                    continue
                rid = req.get("id")
                op = req.get("op")
                if op == "ping":
                    _write(out_fd, {"event": "pong", "id": rid})
                elif op == "go":
                    _go(out_fd, rid, req)
                elif op == "retire":
                    go = _spares.pop(req.get("pid"), None)
                    if go is not None:
                        os.close(go)
                elif op in ("fork", "shell", "task", "spare"):
                    go_r = None
                    if op == "fork":
                        body = kernel_body
                    elif op == "shell":
                        if shell_body is None:
                            _write(out_fd, {"event": "error", "id": rid,
                                            "error": "shell unavailable: %s" % shell_error})
                            continue
                        if not isinstance(req.get("socket"), str) or not req["socket"]:
                            _write(out_fd, {"event": "error", "id": rid,
                                            "error": "shell: 'socket' must be a path"})
                            continue
                        body = shell_body
                    elif runner is None:
                        _write(out_fd, {"event": "error", "id": rid,
                                        "error": "task runner unavailable: %s" % runner_error})
                        continue
                    elif op == "spare":
                        go_r, go_w = os.pipe()  # both ends close-on-exec
                        body = _spare_body(runner, go_r)
                    elif not isinstance(req.get("request"), str) or not req["request"]:
                        _write(out_fd, {"event": "error", "id": rid,
                                        "error": "task: 'request' must be a file path"})
                        continue
                    else:
                        # absolute before the child applies the request's cwd
                        req["request"] = os.path.abspath(req["request"])
                        body = task_body
                    for stream in (sys.stdout, sys.stderr):
                        stream.flush()
                    # every child closes the server's descriptors, the other spares' go pipes
                    # included: no task can start a task in a sibling
                    close_fds = [out_fd, rfd, wfd] + list(_spares.values())
                    if go_r is not None:
                        close_fds.append(go_w)
                    try:
                        pid = os.fork()
                    except OSError as e:
                        if go_r is not None:
                            os.close(go_r)
                            os.close(go_w)
                        _write(out_fd, {"event": "error", "id": rid, "error": "fork: %s" % e})
                        continue
                    if pid == 0:
                        _run_child(req, close_fds, body)
                    if go_r is not None:
                        os.close(go_r)
                        _spares[pid] = go_w
                    _children[pid] = True
                    _write(out_fd, {"event": "forked", "id": rid, "pid": pid})
                else:
                    _write(out_fd, {"event": "error", "id": rid, "error": "unknown op %r" % op})
    except BrokenPipeError:
        pass
    finally:
        for pid in list(_children):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError as e:
                if e.errno != errno.ESRCH:
                    pass
        deadline = time.monotonic() + 2.0
        while _children and time.monotonic() < deadline:
            try:
                _reap(out_fd)
            except OSError:  # om-worker is gone: reap quietly
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                    _children.pop(pid, None)
                except ChildProcessError:
                    break
            time.sleep(0.01)


if __name__ == "__main__":
    main()
    # Replies went out through os.write and the kernels are reaped: nothing is left to flush, and
    # the interpreter's own teardown of the preloaded omegaml/pandas/sklearn modules would add about
    # a second to every worker stop.
    for _stream in (sys.stdout, sys.stderr):
        try:
            _stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)
