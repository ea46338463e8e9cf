"""Where the CPU of one notebook task goes: CPU-seconds (user + system, from wait4) of a child
forked from a process that has imported what om-worker's fork server imports.

    .venv/bin/python bench/kernel_cpu.py [-n 7] [--json out.json]

Starts its own SecantusDB (the seed task's cells write to MongoDB), stores one task notebook the
way ``job.map`` does, then measures, median of N:

- the table of issue 14, forked from this process (which imported the fork server's preload list,
  ran its task preload and froze the collector's generations, as the server does):
  fork and exit; the seed task's cells with plain ``exec``; ``InteractiveShell.instance()``; that
  shell running the cells; ``IPKernelApp.instance().initialize()``;
- the two kernel paths of om-worker, through its own fork server (``python/om_forkserver.py``,
  the child's CPU as the server reports it): the **shell** path (``--kernel-mode shell``, the
  default: ipykernel's shell prepared in the server, the child connects over one socket, runs the
  cells, shuts down) and the **ipykernel** path (a full kernel app forked per run, driven with
  jupyter_client like om-worker drives it).

Only the child's CPU is counted: om-worker's own share and MongoDB's are measured end to end by
bench/run.py. Numbers move with machine load; compare rows of one run.
"""
import argparse
import gc
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, VENV_PY, Secantus, clean_env, log  # noqa: E402

FORKSERVER = ROOT / "python" / "om_forkserver.py"
TASK = "bench-cpu/seed"


def task_job(task_name):
    return {"param": 3, "job_id": 3, "task_group": "bench", "task_name": task_name}


def put_task(task_name):
    """Stores the task notebook as ``job.map`` does (attributes['job'] is what _mark_status
    updates). Run in a forked child, so that this process opens no MongoDB client before the
    forks that are measured."""
    import nbformat
    import omegaml as om

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")])
    om.jobs.put(nb, task_name, attributes={"job": task_job(task_name)})


def seed_cells(task_name):
    """The three cells omega|ml runs for one ``job.map`` parameter (init, the notebook, done)."""
    job = task_job(task_name)
    from omegaml.runtimes.mixins.nbtasks import done_cell_code, init_cell_code

    main = ("import omegaml as om\nparam = _jobdata['param']\n"
            "om.datasets.put({'param': param, 'square': param * param}, 'bench-cpu/%d' % param)\n"
            "print('param', param)")
    return [init_cell_code.format(job=job, task_name=task_name), main, done_cell_code]


# ------------------------------------------------------------------------------------------------
# rows forked from this process
# ------------------------------------------------------------------------------------------------

def fork_cpu(fn):
    """CPU-s of a child running ``fn()`` then ``os._exit(0)``."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException as e:  # reported, not hidden
            os.write(2, ("child failed: %r\n" % (e,)).encode())
            code = 1
        os._exit(code)
    _, status, ru = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("forked child failed")
    return ru.ru_utime + ru.ru_stime


def plain_exec(cells):
    ns = {}
    for c in cells:
        exec(compile(c, "<cell>", "exec"), ns)


def shell_instance():
    from IPython.core.interactiveshell import InteractiveShell

    InteractiveShell.instance()


def shell_cells(cells):
    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    for c in cells:
        r = sh.run_cell(c, store_history=True)
        if not r.success:
            raise RuntimeError("cell failed")


def kernel_app_initialize():
    from ipykernel import kernelapp

    d = tempfile.mkdtemp()
    app = kernelapp.IPKernelApp.instance()
    app.initialize(["-f", os.path.join(d, "k.json"), "--HistoryManager.hist_file=:memory:"])


# ------------------------------------------------------------------------------------------------
# om-worker's fork server: shell and ipykernel paths
# ------------------------------------------------------------------------------------------------

class ForkServer:
    def __init__(self, env, cwd, shell):
        args = [str(VENV_PY), str(FORKSERVER)] + ([] if shell else ["--no-shell"])
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                  cwd=cwd)
        self.env, self.cwd, self.id = env, cwd, 0
        ready = self.event()
        if ready.get("event") != "ready" or (shell and ready.get("shell")):
            raise RuntimeError("fork server not ready: %r" % ready)

    def event(self):
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("fork server exited")
        return json.loads(line)

    def request(self, op, **fields):
        self.id += 1
        req = dict(op=op, id=self.id, env=self.env, cwd=self.cwd, rlimit_as=None, **fields)
        self.p.stdin.write((json.dumps(req) + "\n").encode())
        self.p.stdin.flush()
        ev = self.event()
        if ev.get("event") != "forked":
            raise RuntimeError("fork failed: %r" % ev)
        return ev["pid"]

    def exit_cpu(self, pid):
        while True:
            ev = self.event()
            if ev.get("event") == "exit" and ev.get("pid") == pid:
                if ev.get("code") != 0:
                    raise RuntimeError("child exited with %r" % ev)
                return ev["cpu_s"]

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=30)


class ShellPeer:
    """om-worker's side of the shell socket (see python/om_shell.py for the framing)."""

    U32 = struct.Struct("<I")

    def __init__(self, conn):
        from jupyter_client.session import Session

        # a key only to keep Session from warning; the shell socket is unsigned (as om-worker)
        self.conn, self.buf = conn, b""
        self.session = Session(key=b"unused")
        self.session.key = b""

    def send(self, channel, msg_type, content):
        msg = self.session.msg(msg_type, content)
        parts = [channel] + self.session.serialize(msg)
        self.conn.sendall(self.U32.pack(len(parts)) + b"".join(
            self.U32.pack(len(p)) + bytes(p) for p in parts))
        return msg["header"]["msg_id"]

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise EOFError("shell closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self):
        (n,) = self.U32.unpack(self._need(4))
        parts = [self._need(self.U32.unpack(self._need(4))[0]) for _ in range(n)]
        _, rest = self.session.feed_identities(parts[1:])
        return self.session.deserialize(rest)

    def request(self, channel, msg_type, content, reply_type):
        mid = self.send(channel, msg_type, content)
        reply = idle = None
        while reply is None or idle is None:
            m = self.recv()
            if m["parent_header"].get("msg_id") != mid:
                continue
            if m["msg_type"] == reply_type:
                reply = m
            elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                idle = m
        return reply


def execute_content(code):
    return {"code": code, "silent": False, "store_history": True, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True}


def shell_path_cpu(server, cells):
    d = tempfile.mkdtemp()
    path = os.path.join(d, "shell")
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(path)
    ls.listen(1)
    pid = server.request("shell", socket=path)
    conn, _ = ls.accept()
    peer = ShellPeer(conn)
    peer.request(b"shell", "kernel_info_request", {}, "kernel_info_reply")
    for c in cells:
        r = peer.request(b"shell", "execute_request", execute_content(c), "execute_reply")
        if r["content"]["status"] != "ok":
            raise RuntimeError("cell failed: %s" % r["content"].get("evalue"))
    peer.send(b"control", "shutdown_request", {"restart": False})
    cpu = server.exit_cpu(pid)
    conn.close()
    ls.close()
    return cpu


def ipykernel_path_cpu(server, cells):
    from jupyter_client import BlockingKernelClient
    from jupyter_client.connect import write_connection_file

    d = tempfile.mkdtemp()
    cf, _ = write_connection_file(os.path.join(d, "kernel.json"), transport="ipc",
                                  ip=os.path.join(d, "k"))
    pid = server.request("fork", argv=["-f", cf, "--HistoryManager.hist_file=:memory:"])
    kc = BlockingKernelClient(connection_file=cf)
    kc.load_connection_file()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    for c in cells:
        r = kc.execute_interactive(c, timeout=60, output_hook=lambda m: None)
        if r["content"]["status"] != "ok":
            raise RuntimeError("cell failed")
    kc.shutdown()
    cpu = server.exit_cpu(pid)
    kc.stop_channels()
    return cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=7, help="runs per row (median)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="om-kernel-cpu-"))
    mongo = Secantus(run_dir).start()
    try:
        env = clean_env({"OMEGA_MONGO_URL": mongo.url, "OMEGA_TMP": str(run_dir),
                         "OMEGA_CONFIG_FILE": str(run_dir / "no-such-config.yml"),
                         "OMEGA_BROKER": "amqp://guest:guest@127.0.0.1:5672//"})
        os.environ.clear()
        os.environ.update(env)
        os.chdir(run_dir)
        # the fork server's imports, in this process too (for the rows forked from here)
        sys.path.insert(0, str(ROOT / "python"))
        import om_forkserver

        for m in om_forkserver.DEFAULT_PRELOAD + om_forkserver.KERNEL_MODULES:
            __import__(m)
        om_forkserver._load_sibling("om_taskrunner").preload_for_fork()
        gc.freeze()  # as the fork server does before its first fork
        fork_cpu(lambda: put_task(TASK))
        cells = seed_cells(TASK)

        rows = []

        def row(name, fn):
            samples = [fn() for _ in range(args.n)]
            rows.append({"row": name, "cpu_s": statistics.median(samples),
                         "min": min(samples), "max": max(samples)})
            log("%-62s %.3f CPU-s (min %.3f, max %.3f)" % (name, rows[-1]["cpu_s"],
                                                          min(samples), max(samples)))

        row("fork and exit", lambda: fork_cpu(lambda: None))
        row("the seed task's cells with plain exec", lambda: fork_cpu(lambda: plain_exec(cells)))
        row("IPython InteractiveShell.instance()", lambda: fork_cpu(shell_instance))
        row("that shell running the seed task's cells", lambda: fork_cpu(lambda: shell_cells(cells)))
        row("IPKernelApp.instance().initialize() alone", lambda: fork_cpu(kernel_app_initialize))

        srv = ForkServer(env, str(run_dir), shell=True)
        try:
            row("om-worker shell path: start, the seed cells, shutdown",
                lambda: shell_path_cpu(srv, cells))
            row("om-worker shell path: start and shutdown (no cells)",
                lambda: shell_path_cpu(srv, []))
        finally:
            srv.close()
        srv = ForkServer(env, str(run_dir), shell=False)
        try:
            row("forked ipykernel app: start, the seed cells, shutdown",
                lambda: ipykernel_path_cpu(srv, cells))
        finally:
            srv.close()
        print()
        print("| what the child does | CPU-s (median of %d) |" % args.n)
        print("|---|---|")
        for r in rows:
            print("| %s | %.3f |" % (r["row"], r["cpu_s"]))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    finally:
        mongo.stop()


if __name__ == "__main__":
    main()
