"""om-worker task runner: runs one omega|ml Celery task in a fresh process, without pickle.

om-worker (Rust) decodes the task message with its own safe decoder and writes a request file;
the fork server (``om_forkserver.py``, op ``task``) forks a fresh child from its pre-imported
parent and calls :func:`run` with that request. One child per task, never reused. The message
is never unpickled in Python: the arguments arrive as *typed JSON* and are rebuilt here from
data only.

Request (JSON object, written by om-worker)::

    {"task": "omegaml.tasks.omega_predict", "id": "<task id>",
     "args": <typed JSON list>, "kwargs": <typed JSON {"$dict": ...}>,
     "request": {"retries": 0, "hostname": "<nodename>", "delivery_info": {...}, "reply_to": ...,
                 "correlation_id": ..., "root_id": ..., "parent_id": ..., "group": ...,
                 "group_index": ..., "eta": ..., "expires": ..., "timelimit": [hard, soft],
                 "origin": ..., "ignore_result": false},          (plain JSON, not typed)
     "soft_time_limit": s | null,         (the worker's, when neither message nor task sets one)
     "default_queue": "<queue>",           (optional: the app's task_default_queue for this task)
     "callbacks": <typed JSON list of signatures> | null,        (the message's link)
     "errbacks": <typed JSON list of signatures> | null,         (link_error)
     "chain": <typed JSON list of signatures> | null,            (next one last)
     "chord": <typed JSON signature> | null,                     (the chord's body)
     "result_serializer": "pickle" | "json",
     "result_dir": "<private directory>",
     "done_fifo": "<FIFO om-worker reads>" | absent}       (one byte written after outcome.json)

Outcome, written into ``result_dir``:

- ``result.bin``: on SUCCESS when the result is to be stored (not ``ignore_result``): the result
  value alone, serialized with kombu's registry (``pickle``: ``pickle.dumps(value,
  protocol=kombu.serialization.pickle_protocol)``, 4 unless ``PICKLE_PROTOCOL`` is set; ``json``:
  ``kombu.utils.json.dumps``, UTF-8). It is produced inside the backend's ``mark_as_done`` as in
  Celery, so a value the serializer cannot encode turns into a FAILURE (``EncodeError``) with the
  task's ``on_failure`` called, exactly as the Python worker reports it.
- ``exception.bin`` (optional, FAILURE/RETRY with an exception): the exception as Celery's
  backend would put it into the result meta (``pickle``: ``get_pickleable_exception(exc)``
  pickled; ``json``: ``{"exc_type", "exc_message", "exc_module"}``). om-worker may splice it
  instead of rebuilding the exception from ``outcome.json``.
- ``outcome.json``, LAST and atomically (temp file + ``os.rename``)::

    {"status": "SUCCESS"|"FAILURE"|"RETRY"|"REJECTED"|"IGNORED",
     "content_type": ..., "content_encoding": ...,        (of result.bin / exception.bin)
     "result_stored": bool,                                 (result.bin written)
     "exc_type": ..., "exc_module": ..., "exc_message": <typed JSON list of exc.args>,
     "traceback": "<text>" | null,
     "retry": {"countdown": s|null, "eta": iso|null, "max_retries": n|null, "retries": n,
               "queue": ..., "priority": ..., "options": <typed JSON dict>,
               "args": <typed JSON list>, "kwargs": <typed JSON dict>},   (args/kwargs only when
                                                      retry() was given new ones)
     "requeue": bool,                                       (REJECTED only)
     "sent": [[task name, routing key, count], ...],        (task messages the task published;
                                                             only when it published any)
     "runtime": seconds}

  ``retry`` is present whenever the task called ``self.retry()`` (what the child republished,
  for om-worker's log); with ``retry(throw=False)`` the status can then still be SUCCESS.
  REJECTED (``celery.exceptions.Reject``) and IGNORED (``Ignore``) store no result, as in Celery.

Exit status: 0 when outcome.json was written, 1 when it could not be written, 2 for a request
without a usable ``result_dir``; a task that ends the process itself (``sys.exit``, a signal)
leaves no outcome.json, which om-worker reports like Celery's ``WorkerLostError``.

How the task runs: like a prefork pool child of ``celery --app omegaml.celeryapp worker``
(``celery.concurrency.prefork.process_initializer``: default modules imported, logging set up,
``worker_process_init`` sent, task joins blocking) and then through
``celery.app.trace.build_tracer(..., eager=False)`` with a request dict built as
``celery.worker.request.Request`` builds it: ``self.request.is_eager`` is False, the task's
``before_start``/``on_success``/``on_failure``/``on_retry``/``after_return`` handlers and the
task signals run as in the worker. The task's backend is a capture proxy
(:class:`CaptureBackend`): this task's own result is recorded instead of stored (om-worker
stores it); chord counting, errbacks, chain failure and everything else (``update_state``,
other task ids) run on the app's real backend. Canvas runs as in Celery's worker: the tracer
publishes the ``link`` callbacks and the next ``chain`` element with the task's result, and
``Task.retry`` republishes the task, all through the app's broker (``OMEGA_BROKER``, set by
om-worker to its own).
``track_started`` is off in the child because om-worker stores STARTED itself. The soft time
limit (message ``timelimit[1]``, else the task's, else ``task_soft_time_limit``) raises
``SoftTimeLimitExceeded`` in the task via SIGUSR1, as billiard does; om-worker may also send
SIGUSR1 itself. The hard limit is om-worker's (it kills the process group).

Typed JSON: ``null``/``true``/``false``/integers/floats/strings/arrays as JSON; one-key objects
``$float`` ("nan"/"inf"/"-inf"), ``$tuple``, ``$set``, ``$dict`` ([[k, v], ...], all dicts),
``$bytes`` (base64), ``$int`` (decimal text), ``$datetime``/``$date``/``$time`` (ISO 8601),
``$timedelta`` ([days, seconds, microseconds]), ``$decimal``, ``$uuid``, and ``$object``
({"class", "args", "state"}) for the allow-listed classes in :data:`OBJECT_CLASSES` only; any
other class is refused with a ``TypeError`` before anything is imported.

``python om_taskrunner.py --list-tasks`` prints the task names registered by
``omegaml.celeryapp`` as a JSON list, Celery's builtins (``celery.chord_unlock``, ...) included,
as a Python worker of that app runs them.

Only the standard library plus what the fork server preloads (omegaml, celery, kombu) is used.
"""

import base64
import datetime
import decimal
import json
import math
import os
import signal
import sys
import time
import threading
import traceback
import uuid as uuid_mod

OUTCOME_FILE = "outcome.json"
RESULT_FILE = "result.bin"
EXCEPTION_FILE = "exception.bin"
SERIALIZERS = ("pickle", "json")
MAX_DEPTH = 200  # typed JSON nesting (encoding: deeper values become their repr)

_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1


# =============================================================================================
# typed JSON -> Python
# =============================================================================================

def _make_passthrough(args, state, app):
    from omegaml.mixins.store.passthrough import PassthroughDataset

    cls = PassthroughDataset
    # as pickle's NEWOBJ + BUILD: cls.__new__(cls, *args), then the instance dict from the state
    obj = cls.__new__(cls, *args)
    if state is not None:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise TypeError("typed JSON: PassthroughDataset state must be a dict with str keys")
        obj.__dict__.update(state)
    if "_passthrough_data" not in obj.__dict__:
        raise TypeError("typed JSON: PassthroughDataset without _passthrough_data")
    return obj


def _make_signature(args, state, app):
    from celery.canvas import signature

    if len(args) != 1 or not isinstance(args[0], dict) or state is not None:
        raise TypeError("typed JSON: celery.canvas.signature takes exactly one dict argument")
    return signature(args[0], app=app)


def _make_range(args, state, app):
    if (len(args) != 3 or not all(type(a) is int for a in args) or args[2] == 0
            or state is not None):
        raise TypeError("typed JSON: builtins.range takes three ints (start, stop, step != 0)")
    return range(*args)


_DTYPE_KINDS = set("biufcmMUS")  # numbers, times, text; no structured (V) dtypes


def _make_dtype(args, state, app):
    import numpy

    if (len(args) != 3 or not isinstance(args[0], str) or type(args[1]) is not bool
            or type(args[2]) is not bool):
        raise TypeError("typed JSON: numpy.dtype takes (name, align, copy)")
    dt = numpy.dtype(args[0], args[1], args[2])
    if dt.kind not in _DTYPE_KINDS and dt.str not in ("|O", "|O8"):
        raise TypeError("typed JSON: numpy.dtype %r is not accepted" % (args[0],))
    if state is not None:
        if not isinstance(state, tuple) or len(state) < 8 or any(
                state[i] is not None for i in (2, 3, 4)):
            raise TypeError("typed JSON: numpy.dtype state without fields/names expected")
        dt.__setstate__(state)
    return dt


def _make_ndarray(args, state, app):
    import numpy

    if args or not isinstance(state, tuple) or len(state) != 5:
        raise TypeError("typed JSON: numpy.ndarray needs (version, shape, dtype, fortran, data)")
    version, shape, dtype, fortran, data = state
    if (not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape)
            or not isinstance(dtype, numpy.dtype) or type(fortran) is not bool
            or not isinstance(data, (bytes, list))):
        raise TypeError("typed JSON: numpy.ndarray state has the wrong parts")
    if isinstance(data, list) != dtype.hasobject:
        raise TypeError("typed JSON: numpy.ndarray data does not fit its dtype")
    arr = numpy.ndarray((0,), dtype="b")
    arr.__setstate__((version, shape, dtype, fortran, data))
    return arr


def _make_numpy_scalar(args, state, app):
    import numpy

    if len(args) != 2 or not isinstance(args[0], numpy.dtype) or not isinstance(args[1], bytes):
        raise TypeError("typed JSON: a numpy scalar takes (dtype, bytes)")
    if args[0].hasobject:
        raise TypeError("typed JSON: object numpy scalars are not accepted")
    return numpy.frombuffer(args[1], dtype=args[0], count=1)[0]


#: the only classes a ``$object`` may name; the values build them from data (no name lookup)
OBJECT_CLASSES = {
    "omegaml.mixins.store.passthrough.PassthroughDataset": _make_passthrough,
    "celery.canvas.signature": _make_signature,
    "builtins.range": _make_range,
    "numpy.ndarray": _make_ndarray,
    "numpy.dtype": _make_dtype,
    "numpy.core.multiarray.scalar": _make_numpy_scalar,
}

_FLOATS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _expect(cond, tag, what):
    if not cond:
        raise ValueError("typed JSON: %s expects %s" % (tag, what))


def decode(value, app=None, _depth=0):
    """Rebuild a Python value from typed JSON (already parsed by ``json.loads``)."""
    if _depth > MAX_DEPTH:
        raise ValueError("typed JSON: nesting deeper than %d" % MAX_DEPTH)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    d = _depth + 1
    if isinstance(value, list):
        return [decode(v, app, d) for v in value]
    if not isinstance(value, dict):  # pragma: no cover - json.loads yields nothing else
        raise TypeError("typed JSON: unexpected %s" % type(value).__name__)
    if len(value) != 1:
        raise TypeError("typed JSON: an object must have exactly one $-key, got %r"
                        % sorted(value)[:5])
    (tag, v), = value.items()
    if tag == "$dict":
        _expect(isinstance(v, list), tag, "a list of [key, value] pairs")
        out = {}
        for pair in v:
            _expect(isinstance(pair, list) and len(pair) == 2, tag, "[key, value] pairs")
            out[decode(pair[0], app, d)] = decode(pair[1], app, d)
        return out
    if tag == "$tuple":
        _expect(isinstance(v, list), tag, "a list")
        return tuple(decode(x, app, d) for x in v)
    if tag == "$set":
        _expect(isinstance(v, list), tag, "a list")
        return set(decode(x, app, d) for x in v)
    if tag == "$float":
        _expect(v in _FLOATS, tag, '"nan", "inf" or "-inf"')
        return _FLOATS[v]
    if tag == "$int":
        _expect(isinstance(v, str), tag, "decimal text")
        return int(v, 10)
    if tag == "$bytes":
        _expect(isinstance(v, str), tag, "base64 text")
        return base64.b64decode(v.encode("ascii"), validate=True)
    if tag == "$datetime":
        _expect(isinstance(v, str), tag, "ISO 8601 text")
        return datetime.datetime.fromisoformat(v)
    if tag == "$date":
        _expect(isinstance(v, str), tag, "YYYY-MM-DD")
        return datetime.date.fromisoformat(v)
    if tag == "$time":
        _expect(isinstance(v, str), tag, "HH:MM:SS.ffffff")
        return datetime.time.fromisoformat(v)
    if tag == "$timedelta":
        _expect(isinstance(v, list) and len(v) == 3 and all(type(x) is int for x in v), tag,
                "[days, seconds, microseconds] integers")
        return datetime.timedelta(days=v[0], seconds=v[1], microseconds=v[2])
    if tag == "$decimal":
        _expect(isinstance(v, str), tag, "text")
        return decimal.Decimal(v)
    if tag == "$uuid":
        _expect(isinstance(v, str), tag, "hex text")
        return uuid_mod.UUID(v)
    if tag == "$object":
        _expect(isinstance(v, dict) and isinstance(v.get("class"), str), tag,
                '{"class": ..., "args": [...], "state": ...}')
        cls = v["class"]
        make = OBJECT_CLASSES.get(cls)
        if make is None:
            raise TypeError("typed JSON: $object class %r is not allowed (allowed: %s)"
                            % (cls, ", ".join(sorted(OBJECT_CLASSES))))
        args = v.get("args") or []
        _expect(isinstance(args, list), tag, "args as a list")
        args = [decode(a, app, d) for a in args]
        state = v.get("state")
        state = None if state is None else decode(state, app, d)
        return make(args, state, app)
    raise TypeError("typed JSON: unknown tag %r" % (tag,))


# =============================================================================================
# Python -> typed JSON (exception args, retry arguments)
# =============================================================================================

def encode(value, _depth=0):
    """Typed JSON for a Python value; what it cannot represent becomes its ``repr()``."""
    try:
        return _encode(value, _depth)
    except Exception:
        return _safe_repr(value)


def _safe_repr(value):
    try:
        return repr(value)
    except Exception as e:  # noqa: BLE001 - a broken __repr__
        return "<unrepresentable %s: %r>" % (type(value).__name__, e)


def _encode(value, depth):
    if depth > MAX_DEPTH:
        return _safe_repr(value)
    d = depth + 1
    t = type(value)
    if value is None or t is bool or t is str:
        return value
    if t is int:
        return value if _INT64_MIN <= value <= _INT64_MAX else {"$int": str(value)}
    if t is float:
        if math.isnan(value):
            return {"$float": "nan"}
        if math.isinf(value):
            return {"$float": "inf" if value > 0 else "-inf"}
        return value
    if t is list:
        return [_encode(v, d) for v in value]
    if t is tuple:
        return {"$tuple": [_encode(v, d) for v in value]}
    if t is dict:
        return {"$dict": [[_encode(k, d), _encode(v, d)] for k, v in value.items()]}
    if t in (set, frozenset):
        return {"$set": [_encode(v, d) for v in value]}
    if t in (bytes, bytearray):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if t is range:
        return {"$object": {"class": "builtins.range",
                            "args": [_encode(value.start, d), _encode(value.stop, d),
                                     _encode(value.step, d)], "state": None}}
    if isinstance(value, datetime.datetime):
        return {"$datetime": value.isoformat(timespec="microseconds")}
    if isinstance(value, datetime.date):
        return {"$date": value.isoformat()}
    if isinstance(value, datetime.time):
        return {"$time": value.isoformat(timespec="microseconds")}
    if isinstance(value, datetime.timedelta):
        return {"$timedelta": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, uuid_mod.UUID):
        return {"$uuid": value.hex}
    name = "%s.%s" % (t.__module__, t.__qualname__)
    if name == "omegaml.mixins.store.passthrough.PassthroughDataset":
        return {"$object": {"class": name, "args": [str.__str__(value)],
                            "state": _encode(dict(value.__dict__), d)}}
    if name == "celery.canvas.Signature":
        return {"$object": {"class": "celery.canvas.signature", "args": [_encode(dict(value), d)],
                            "state": None}}
    # subclasses of the plain types (IntEnum, str subclasses, OrderedDict, ...) as their base
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return _encode(int(value), d)
    if isinstance(value, float):
        return _encode(float(value), d)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, dict):
        return {"$dict": [[_encode(k, d), _encode(v, d)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return _encode(list(value) if isinstance(value, list) else tuple(value), d)
    return _safe_repr(value)


# =============================================================================================
# the app, set up as a prefork pool child of `celery --app omegaml.celeryapp worker`
# =============================================================================================

_app = None


def load_app():
    """``omegaml.celeryapp.app`` with all of omega|ml's task modules imported."""
    global _app
    if _app is None:
        from omegaml.celeryapp import app

        app.loader.import_default_modules()  # autodiscover_tasks(OMEGA_CELERY_IMPORTS)
        app.finalize(auto=True)
        _app = app
    return _app


def list_tasks(app=None):
    app = app or load_app()
    return sorted(app.tasks.keys())


def _init_worker_process(app, hostname):
    """What ``celery.concurrency.prefork.process_initializer`` does in a forked pool child."""
    from celery import platforms, signals
    from celery._state import _set_task_join_will_block, set_default_app
    from celery.app import trace as trace_mod

    # a plain-process child ends with om-worker, its parent, as a pool child with its worker
    # (prctl(PR_SET_PDEATHSIG, SIGKILL)); a fork server child is watched by the server's
    # _watch_owner instead (OWNER_WATCHED); through the libc handle the fork server resolved before forking when there is one (billiard's
    # set_pdeathsig parses a cffi cdef or loads libc on every call: ~35 ms of the child's time)
    if not OWNER_WATCHED and not _set_pdeathsig_fast(signal.SIGKILL):
        platforms.set_pdeathsig("SIGKILL")
    _set_task_join_will_block(True)  # result.get() inside a task raises, as in the worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # WORKER_SIGIGNORE
    app.loader.init_worker()
    app.loader.init_worker_process()
    app.log.setup(int(os.environ.get("CELERY_LOG_LEVEL", 0) or 0),
                  os.environ.get("CELERY_LOG_FILE") or None,
                  bool(os.environ.get("CELERY_LOG_REDIRECT", False)),
                  str(os.environ.get("CELERY_LOG_REDIRECT_LEVEL")),
                  hostname=hostname)
    app.set_current()
    set_default_app(app)
    app.finalize()
    trace_mod._tasks = app._tasks
    # omega|ml connects fix_multiprocessing and preload_frameworks (omegaml/tasks.py); a receiver
    # that raises is logged by Celery's Signal.send, as in the worker.
    signals.worker_process_init.send(sender=hostname)


# =============================================================================================
# serialization and the capture backend
# =============================================================================================

def serialize(value, serializer):
    """(content_type, content_encoding, bytes) exactly as kombu's registry encodes ``value``."""
    from kombu.serialization import registry

    content_type, content_encoding, data = registry.dumps(value, serializer=serializer)
    if isinstance(data, str):
        data = data.encode(content_encoding if content_encoding not in (None, "binary") else "utf-8")
    return content_type, content_encoding, data


def prepare_exception(exc, serializer):
    """``celery.backends.base.BaseBackend.prepare_exception`` for the given serializer."""
    from celery.utils.serialization import ensure_serializable, get_pickleable_exception

    if serializer == "pickle":
        return get_pickleable_exception(exc)
    exctype = type(exc)
    return {"exc_type": getattr(exctype, "__qualname__", exctype.__name__),
            "exc_message": ensure_serializable(exc.args, lambda v: serialize(v, serializer)),
            "exc_module": exctype.__module__}


class CaptureBackend:
    """The task's backend in the child: records this task's outcome instead of storing it.

    Storing the running task's own result is om-worker's job (it retries while the backend is
    away), so ``store_result`` for this task id records the outcome (the value is serialized
    here, so an unencodable result raises kombu's ``EncodeError`` inside the tracer as the real
    backend's ``store_result`` would). Everything else Celery's backend does when a task ends
    runs for real, through the backend class's own ``mark_as_*`` code with this proxy as
    ``self``: a chord part's ``on_chord_part_return`` (the chord counter in redis://), the
    errbacks of a failure (``link_error``), the FAILURE of the remaining chain elements. Any
    other call, or another task id, goes to the app's real backend (``update_state`` progress,
    ``AsyncResult`` of subtasks)."""

    def __init__(self, app, task_id, serializer):
        self._app = app
        self._task_id = task_id
        self._serializer = serializer
        self.outcome = None  # (state, value or exc, traceback)
        self.result = None  # (content_type, content_encoding, bytes) when stored

    @property
    def _real(self):
        return self._app.backend

    def __getattr__(self, name):
        return getattr(self._real, name)

    def store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        if task_id != self._task_id:
            return self._real.store_result(task_id, result, state, traceback=traceback,
                                           request=request, **kwargs)
        if state == "SUCCESS":
            from celery.result import ResultBase

            value = result
            if self._serializer != "pickle" and isinstance(value, ResultBase):
                value = value.as_tuple()  # BaseBackend.prepare_value
            self.result = serialize(value, self._serializer)
        self.outcome = (state, result, traceback)
        return result

    def mark_as_done(self, task_id, result, request=None, store_result=True, state="SUCCESS"):
        if task_id != self._task_id:
            return self._real.mark_as_done(task_id, result, request=request,
                                           store_result=store_result, state=state)
        # recorded even when the result is not stored (ignore_result): the task did succeed
        self.outcome = ("SUCCESS", result, None)
        return type(self._real).mark_as_done(self, task_id, result, request=request,
                                             store_result=store_result, state=state)

    def mark_as_failure(self, task_id, exc, traceback=None, request=None, store_result=True,
                        call_errbacks=True, state="FAILURE"):
        if task_id != self._task_id:
            return self._real.mark_as_failure(task_id, exc, traceback=traceback, request=request,
                                              store_result=store_result,
                                              call_errbacks=call_errbacks, state=state)
        self.outcome = ("FAILURE", exc, traceback)
        return type(self._real).mark_as_failure(self, task_id, exc, traceback=traceback,
                                                request=request, store_result=store_result,
                                                call_errbacks=call_errbacks, state=state)

    def mark_as_retry(self, task_id, exc, traceback=None, request=None, store_result=True,
                      state="RETRY"):
        if task_id != self._task_id:
            return self._real.mark_as_retry(task_id, exc, traceback=traceback, request=request,
                                            store_result=store_result, state=state)
        self.outcome = ("RETRY", exc, traceback)
        return None

    def process_cleanup(self):
        real = getattr(self._app._local, "backend", None)  # only if the task created it
        if real is not None:
            real.process_cleanup()

    def prepare_exception(self, exc, serializer=None):
        return prepare_exception(exc, serializer or self._serializer)


# =============================================================================================
# outcome files
# =============================================================================================

def _write_atomic(directory, name, data):
    """Whole or absent for om-worker, which reads it on this host once the child has exited (so
    no fsync: the rename is what makes it atomic; surviving a power cut is not needed)."""
    tmp = os.path.join(directory, ".%s.tmp" % name)
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, os.path.join(directory, name))


def _write_outcome(directory, outcome):
    data = json.dumps(outcome, separators=(",", ":"), allow_nan=False).encode()
    _write_atomic(directory, OUTCOME_FILE, data)


def _exc_fields(exc):
    """exc_type/exc_module/exc_message as Celery's backend reports them (json flavour, the
    original class behind an UnpickleableExceptionWrapper)."""
    if exc is None:
        return {"exc_type": None, "exc_module": None, "exc_message": []}
    from celery.utils.serialization import UnpickleableExceptionWrapper

    if isinstance(exc, UnpickleableExceptionWrapper):
        return {"exc_type": exc.exc_cls_name, "exc_module": exc.exc_module,
                "exc_message": [encode(a) for a in (exc.exc_args or ())]}
    et = type(exc)
    args = getattr(exc, "args", ())
    if not isinstance(args, tuple):
        args = (args,)
    return {"exc_type": getattr(et, "__qualname__", et.__name__), "exc_module": et.__module__,
            "exc_message": [encode(a) for a in args]}


#: Task messages this task published (chain elements, callbacks, retries, send_task), as
#: {(task name, routing key): count}, reported as outcome "sent" for om-worker's
#: celery_task_sent_total. Bounded: a task looping over send_task adds no new keys past the cap.
_SENT = {}
_SENT_KEYS_MAX = 100


def _count_sent(sender=None, routing_key=None, headers=None, **_):
    """Celery's ``after_task_publish`` handler: ``sender`` is the task name."""
    name = sender if isinstance(sender, str) else (headers or {}).get("task")
    key = (str(name or "unknown"), str(routing_key or ""))
    if key in _SENT or len(_SENT) < _SENT_KEYS_MAX:
        _SENT[key] = _SENT.get(key, 0) + 1


def _failure(exc, tb_text=None):
    out = {"status": "FAILURE", "content_type": None, "content_encoding": None,
           "result_stored": False, "traceback": tb_text}
    out.update(_exc_fields(exc))
    return out


def _write_exception_bin(directory, exc, serializer, outcome):
    try:
        ct, ce, data = serialize(prepare_exception(exc, serializer), serializer)
        _write_atomic(directory, EXCEPTION_FILE, data)
        outcome["content_type"], outcome["content_encoding"] = ct, ce
    except Exception:  # optional file: outcome.json alone describes the exception
        pass


# =============================================================================================
# running one task
# =============================================================================================

class _RetryCapture:
    """Wraps ``task.signature_from_request`` (only ``Task.retry`` calls it in a task process):
    the retry signature's ``apply_async`` records what it republishes (for outcome.json), then
    publishes it as Celery's worker does (same task id, ``retries`` + 1, the countdown's ETA)."""

    def __init__(self, task, app):
        self.task = task
        self.app = app
        self.info = None
        self._orig = task.signature_from_request

    def __call__(self, request=None, args=None, kwargs=None, queue=None, **extra):
        sig = self._orig(request, args, kwargs, queue=queue, **extra)
        explicit = args is not None or kwargs is not None

        publish = sig.apply_async

        def apply_async(*a, **kw):
            self.info = self._describe(sig, explicit)
            return publish(*a, **kw)

        sig.apply_async = apply_async
        return sig

    def _describe(self, sig, explicit):
        opts = dict(sig.options)
        countdown = opts.get("countdown")
        eta = opts.get("eta")
        if isinstance(eta, datetime.datetime):
            eta_text = eta.isoformat(timespec="microseconds")
        elif isinstance(eta, str):
            eta_text = eta
        elif countdown is not None:
            eta_text = (self.app.now() + datetime.timedelta(seconds=float(countdown))).isoformat(
                timespec="microseconds")
        else:
            eta_text = None
        max_retries = getattr(self.task, "override_max_retries", None)
        if max_retries is None:
            max_retries = self.task.max_retries
        info = {"countdown": encode(countdown), "eta": eta_text,
                "max_retries": encode(max_retries), "retries": encode(opts.get("retries")),
                "queue": encode(opts.get("queue")), "priority": encode(opts.get("priority")),
                "options": encode({k: v for k, v in opts.items()
                                   if k not in ("countdown", "eta", "task_id")})}
        if explicit:
            info["args"] = encode(list(sig.args))
            info["kwargs"] = encode(dict(sig.kwargs))
        return info


def _decode_canvas(request, app):
    """The message's ``callbacks``/``errbacks``/``chain`` (lists of signatures) and ``chord`` (a
    signature), from typed JSON; each absent or empty one is ``None`` as in Celery's request."""
    canvas = {}
    for key in ("callbacks", "errbacks", "chain"):
        value = request.get(key)
        value = decode(value, app) if value is not None else None
        if value is not None and not isinstance(value, (list, tuple)):
            raise TypeError("message %s must be a list of signatures, got %s"
                            % (key, type(value).__name__))
        canvas[key] = [_as_signature(s, app, key) for s in value] if value else None
    chord = request.get("chord")
    chord = decode(chord, app) if chord is not None else None
    canvas["chord"] = _as_signature(chord, app, "chord") if chord else None
    return canvas


def _as_signature(value, app, key):
    from celery.canvas import Signature, signature

    if isinstance(value, Signature):
        return value
    if isinstance(value, dict) and isinstance(value.get("task"), str):
        return signature(value, app=app)
    raise TypeError("message %s holds %s, not a signature" % (key, type(value).__name__))


def _soft_time_limit(task, app, req, worker_soft):
    """Celery's order: the message's soft limit, the task's, the worker's."""
    tl = req.get("timelimit") or (None, None)
    soft = tl[1] if isinstance(tl, (list, tuple)) and len(tl) == 2 else None
    return soft or task.soft_time_limit or worker_soft or app.conf.task_soft_time_limit


def _arm_soft_limit(seconds):
    from billiard.exceptions import SoftTimeLimitExceeded

    def handler(signum, frame):
        raise SoftTimeLimitExceeded()

    signal.signal(signal.SIGUSR1, handler)  # billiard's soft_timeout_sighandler
    if seconds and seconds > 0:
        import threading

        pid = os.getpid()
        t = threading.Timer(float(seconds), os.kill, (pid, signal.SIGUSR1))
        t.daemon = True
        t.start()
        return t
    return None


def _execute(request, result_dir):
    name = request.get("task")
    task_id = request.get("id")
    serializer = request.get("result_serializer") or "pickle"
    req_in = request.get("request") or {}
    if not isinstance(name, str) or not isinstance(task_id, str) or not isinstance(req_in, dict):
        raise ValueError("request needs 'task' and 'id' strings and a 'request' object")
    if serializer not in SERIALIZERS:
        raise ValueError("result_serializer %r is not one of %s" % (serializer, SERIALIZERS))
    hostname = req_in.get("hostname") or None

    app = load_app()
    if _warmed is None:
        _init_worker_process(app, hostname)
    elif _warmed != hostname:
        sys.stderr.write("om_taskrunner: warmed up as %r, the task names %r\n" % (_warmed, hostname))
    default_queue = request.get("default_queue")
    if isinstance(default_queue, str) and default_queue:
        # what the task publishes without a queue of its own stays on this task's queue
        app.conf.task_default_queue = default_queue
        app.amqp.__dict__.pop("queues", None)  # rebuilt with the new default
        app.amqp.__dict__.pop("router", None)
        app.amqp.__dict__.pop("default_queue", None)

    task = app.tasks.get(name)
    if task is None:
        from celery.exceptions import NotRegistered

        return _failure(NotRegistered(name))

    try:
        args = decode(request.get("args", []), app)
        kwargs = decode(request.get("kwargs", {"$dict": []}), app)
        if not isinstance(args, (list, tuple)):
            raise TypeError("task args must be a list, got %s" % type(args).__name__)
        args = list(args)
        canvas = _decode_canvas(request, app)
    except (TypeError, ValueError, OverflowError, RecursionError) as e:
        return _failure(e if not isinstance(e, RecursionError)
                        else ValueError("typed JSON: nesting too deep"),
                        traceback.format_exc())
    _offer_warm_omega(task, kwargs)

    # the request dict as celery.worker.request.Request + trace_task_ret build it
    delivery_info = dict(req_in.get("delivery_info") or {})
    req = {k: v for k, v in req_in.items()}
    req.update({
        "id": task_id, "task": name, "args": args, "kwargs": kwargs,
        "hostname": hostname, "is_eager": False, "delivery_info": delivery_info,
        "properties": {"correlation_id": req_in.get("correlation_id"),
                       "reply_to": req_in.get("reply_to"),
                       "priority": delivery_info.get("priority")},
        # canvas: Celery's tracer publishes the callbacks and the next chain element, the
        # backend (CaptureBackend) counts chord parts and calls the errbacks
        "callbacks": canvas["callbacks"], "errbacks": canvas["errbacks"],
        "chain": canvas["chain"], "chord": canvas["chord"],
    })
    req.setdefault("retries", 0)
    if req.get("root_id") is None:
        req["root_id"] = task_id

    from celery.app.trace import build_tracer
    from celery.exceptions import Reject
    from celery.signals import after_task_publish

    after_task_publish.connect(_count_sent, weak=False)

    backend = CaptureBackend(app, task_id, serializer)
    retry_capture = _RetryCapture(task, app)
    task.backend = backend
    task.track_started = False  # om-worker stores STARTED itself
    task.signature_from_request = retry_capture
    task.__trace__ = build_tracer(name, task, app.loader, hostname, app=app, eager=False)

    worker_soft = request.get("soft_time_limit")
    if not isinstance(worker_soft, (int, float)) or isinstance(worker_soft, bool):
        worker_soft = None
    timer = _arm_soft_limit(_soft_time_limit(task, app, req, worker_soft))
    t0 = time.monotonic()
    try:
        R, I, T, Rstr = task.__trace__(task_id, args, kwargs, req)
    except Reject as exc:  # raised outside the body (e.g. an on_success handler)
        return {"status": "REJECTED", "requeue": bool(exc.requeue), "content_type": None,
                "content_encoding": None, "result_stored": False, "traceback": None,
                **_exc_fields(exc.reason if isinstance(exc.reason, BaseException) else None)}
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        if timer is not None:
            timer.cancel()

    out = {"content_type": None, "content_encoding": None, "result_stored": False,
           "traceback": None, "runtime": round(time.monotonic() - t0, 6)}
    state = getattr(I, "state", None) if I is not None else None
    if state in ("REJECTED", "IGNORED"):
        exc = I.retval
        out["status"] = state
        if state == "REJECTED":
            out["requeue"] = bool(getattr(exc, "requeue", False))
            reason = getattr(exc, "reason", None)
            out.update(_exc_fields(reason if isinstance(reason, BaseException) else None))
        else:
            out.update(_exc_fields(None))
    elif backend.outcome is None:
        # nothing reached the backend: an error outside the body (report_internal_error)
        exc = getattr(I, "retval", None) if I is not None else None
        out.update(_failure(exc if isinstance(exc, BaseException)
                            else RuntimeError("task ended without an outcome"),
                            getattr(R, "traceback", None)))
    else:
        status, value, tb_text = backend.outcome
        out["status"] = status
        if status == "SUCCESS":
            out.update(_exc_fields(None))
            # for om-worker's logs and task events: the tracer's own saferepr (bounded), not a
            # second repr of a possibly large result
            out["repr"] = Rstr[:1024] if isinstance(Rstr, str) else _safe_repr(value)[:1024]
            if backend.result is not None:
                ct, ce, data = backend.result
                _write_atomic(result_dir, RESULT_FILE, data)
                out.update(content_type=ct, content_encoding=ce, result_stored=True)
        else:
            out.update(_exc_fields(value))
            out["traceback"] = tb_text
            if value is not None:
                _write_exception_bin(result_dir, value, serializer, out)
    if retry_capture.info is not None:
        out["retry"] = retry_capture.info
    return out


def run(request):
    """Run one task request (a dict, see the module doc); returns the process exit code."""
    result_dir = request.get("result_dir") if isinstance(request, dict) else None
    if not isinstance(result_dir, str) or not os.path.isdir(result_dir):
        sys.stderr.write("om_taskrunner: request has no usable result_dir: %r\n" % (result_dir,))
        return 2
    if request.get("list_tasks"):
        # {"list_tasks": true, "result_dir": ...}: the task names, as --list-tasks prints them,
        # written to tasks.json (forked from the fork server this costs no imports).
        try:
            _write_atomic(result_dir, "tasks.json", json.dumps(list_tasks()).encode())
        except Exception:
            traceback.print_exc()
            return 1
        return 0
    try:
        outcome = _execute(request, result_dir)
    except Exception as e:  # runner or setup error: still a FAILURE outcome for the client
        outcome = _failure(e, traceback.format_exc())
    if _SENT:
        outcome["sent"] = [[name, queue, n] for (name, queue), n in _SENT.items()]
    # what the task printed reaches om-worker's log before it may end the process
    _flush_std_streams()
    try:
        _write_outcome(result_dir, outcome)
    except Exception:
        traceback.print_exc()
        return 1
    _signal_done(request.get("done_fifo"))
    return 0


def _flush_std_streams():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def _signal_done(path):
    """One byte to om-worker's FIFO (``done_fifo``) once outcome.json is in place: it reports the
    result now instead of after this process's exit (tearing down a process with omega|ml and its
    frameworks mapped takes milliseconds), and ends the process. Non-blocking: with no reader
    (a request run by hand) there is nothing to tell."""
    if not isinstance(path, str):
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    try:
        os.write(fd, b"1")
    except OSError:
        pass
    finally:
        os.close(fd)


def run_file(path):
    with open(path, "rb") as f:
        request = json.loads(f.read(), parse_constant=_no_constant)
    return run(request)


def _no_constant(name):
    raise ValueError("typed JSON: %s is not JSON (use {\"$float\": ...})" % name)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--list-tasks":
        out_fd = os.dup(1)
        os.dup2(2, 1)  # imports that print must not corrupt the JSON on stdout
        names = list_tasks()
        os.write(out_fd, (json.dumps(names) + "\n").encode())
        return 0
    if len(argv) == 1 and not argv[0].startswith("-"):
        return run_file(argv[0])
    sys.stderr.write("usage: om_taskrunner.py --list-tasks | om_taskrunner.py REQUEST.json\n")
    return 2


# =============================================================================================
# preloading in the fork server's parent (before any fork)
# =============================================================================================

_PRCTL = None  # libc's prctl, resolved by preload_for_fork() in the fork server's parent
_PR_SET_PDEATHSIG = 1


def _set_pdeathsig_fast(sig):
    """prctl(PR_SET_PDEATHSIG, sig) through the pre-resolved libc handle; False if there is none
    (or it failed): the caller then uses Celery's ``platforms.set_pdeathsig``."""
    if _PRCTL is None:
        return False
    try:
        return _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except Exception:
        return False


#: modules omega|ml's model tasks import lazily on their first call (measured by diffing
#: ``sys.modules`` in a forked predict/fit child); importing them has no side effects
TASK_MODULES = [
    "celery.app.log",
    "celery.app.trace",
    "celery.backends.rpc",
    "celery.backends.redis",
    "celery.result",
    "billiard.exceptions",
    "kombu.serialization",
    "mongoengine.dereference",
    "omegaml.backends.virtualobj",
    "omegaml.backends.tracking.simple",
    "omegaml.mixins.store.passthrough",
    "omegaml.runtimes.proxies.trackingproxy",
    "joblib",
    # what unpickling a scikit-learn model and predicting on a DataFrame import
    "sklearn.base",
    "sklearn.linear_model",
    "sklearn.pipeline",
    "sklearn.preprocessing",
    "narwhals.stable.v2",
    "narwhals._pandas_like.dataframe",
    "narwhals._pandas_like.namespace",
    "narwhals._interchange.dataframe",
]


def preload_for_fork():
    """What a task child would otherwise do first, done once in the fork server's parent: the
    Celery app loaded and finalized (``load_app``: ``omegaml.celeryapp``, omega|ml's task modules,
    its configuration resolved from this process's env and cwd, which every child shares), the
    loader's worker init (as the Python worker's parent process), the modules the tasks import
    lazily, libc's ``prctl``. Opens no connection and starts no thread:
    the app's backend, broker pool and producer are created lazily in the child, and the omega|ml
    instance ``omegaml.celeryapp`` builds for its defaults (its stores connect to MongoDB only on
    first use) is dropped again, so each child (task or kernel) sets up its own omega|ml client as
    a fresh process does. Returns ``{module: None | error text}`` for the optional imports."""
    global _PRCTL
    import ctypes
    import importlib

    try:
        _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        _PRCTL = None
    app = load_app()
    app.conf.result_backend  # noqa: B018  (finalizes the pending configuration; no connection)
    # as the Python worker's parent does (WorkController): imports the default modules and sets
    # loader.worker_initialized, so that the child's init_worker() (process_initializer) does
    # not re-run the task autodiscovery (~20 ms), exactly as in a prefork pool child
    app.loader.init_worker()
    results = {}
    for mod in TASK_MODULES:
        try:
            importlib.import_module(mod)
            results[mod] = None
        except Exception as e:  # the task imports it itself, as before
            results[mod] = "%s: %s" % (type(e).__name__, e)
    _reset_default_omega()
    return results


#: set by the fork server in its task children: they end with om-worker (the server watches it
#: for them), not with their parent, so no parent-death signal (plain-process children: their
#: parent is om-worker, and Celery's PR_SET_PDEATHSIG is right)
OWNER_WATCHED = False

_warmed = None  # the hostname warm_up() initialised this process for (a spare child)
_warm_omega = None  # (omega|ml instance, its warm-up thread) from warm_up(), until the task takes it

#: what warm_up() looks up in each store to open it (a name no one stores: one find, no result)
WARM_UP_NAME = "__om-worker warm-up: no such object__"
#: how long a task that arrives while the warm-up still runs waits for it before setting up its
#: own omega|ml instance, as a cold child does (the warm-up normally takes tens of ms)
WARM_UP_WAIT_S = 1.0


def warm_up(hostname):
    """In a spare task child (forked ahead of its task, see om_forkserver's ``spare`` op): what
    every task child does before its task that does not depend on the task -- Celery's
    worker-process init (as a prefork pool child right after its fork) and the default omega|ml
    instance (what a fresh process's first ``OmegamlTask.om`` creates for the default auth), its
    datasets and models stores opened in the background: MongoDB connected (omega|ml pings),
    GridFS and metadata indexes ensured, as their first use in the task would. ``_execute`` hands
    that instance to the task (``_offer_warm_omega``). Runs in the child only: nothing returns to
    the fork server, and the child runs at most one task."""
    global _warmed, _warm_omega
    app = load_app()
    _init_worker_process(app, hostname)
    _warmed = hostname
    try:
        from omegaml import _omega

        deferred = getattr(_omega, "_om", None)
        if deferred is None:
            return
        deferred.setup()
        om = deferred.omega
    except Exception:  # the task sets omega|ml up itself, as a cold child does
        traceback.print_exc()
        return

    def open_stores():
        try:
            from omegaml.store.base import OmegaStore

            for store in (om.datasets, om.models):
                # the store's own lookup, without the mixins' extra queries: connects the client,
                # ensures the GridFS and metadata indexes (idempotent; read-only users are
                # tolerated by omega|ml), one find
                OmegaStore.metadata(store, WARM_UP_NAME)
        except Exception:  # reported by the task's own first command, if it still fails
            pass

    thread = threading.Thread(target=open_stores, name="om-warm-omega", daemon=True)
    thread.start()
    _warm_omega = (om, thread)


def _offer_warm_omega(task, kwargs):
    """Before the task in a spare child: let ``OmegamlTask.om`` find warm_up()'s instance.

    omega|ml gets a task's instance from ``AuthenticationEnv.get_omega_for_task(task, auth)``,
    which calls ``omegaml.setup()`` -- a new ``Omega`` whose stores connect and ensure their
    indexes on first use (~11 MongoDB commands, ~15 ms in the task) -- and memoises it in its
    session cache; in a fresh process that first instance also becomes the module default. Here
    the module default is warm_up()'s instance, so the same instance goes into that cache for
    this task's key: what a cold child builds, already open. Only for omega|ml's own
    environment (an auth env that overrides ``get_omega_for_task``, e.g. omega|ml cloud, builds
    per-user instances and is left alone); anything unexpected leaves the task to set up its own,
    as before."""
    global _warm_omega
    if _warm_omega is None:
        return
    om, thread = _warm_omega
    _warm_omega = None
    # joined for every task, omega|ml's or not: task code may use the module default instance
    # (`import omegaml as om`), which the thread is opening (normally done long before the task)
    thread.join(WARM_UP_WAIT_S)
    if thread.is_alive():  # MongoDB slow to answer: not shared with a thread still using it
        return
    try:
        from omegaml.client.auth import AuthenticationEnv

        auth_env = getattr(task, "auth_env", None)
        memo = AuthenticationEnv.get_omega_for_task.__func__
        if auth_env is None or getattr(auth_env.get_omega_for_task, "__func__", None) is not memo:
            return
        cache, key_of = getattr(memo, "cache", None), getattr(memo, "cache_key", None)
        if cache is None or key_of is None:
            return
        auth = kwargs.get("__auth") if isinstance(kwargs, dict) else None
        key = key_of(auth_env, task, auth=auth)  # how the memo keys the task's own call
        if key not in cache:
            cache[key] = om
    except Exception:  # e.g. an unhashable auth token: the task's own call handles it as before
        return


def _reset_default_omega():
    """``import omegaml.celeryapp`` ran ``omegaml.setup()``: the module-wide default instance is
    set. Put it back to the deferred, uninitialized state of a fresh process (no client object
    survives into the children; the first ``om.<store>`` access there creates its own)."""
    omega_mod = sys.modules.get("omegaml.omega")
    om = getattr(omega_mod, "_om", None)
    if om is not None and getattr(om, "initialized", False):
        om.initialized = False
        om.omega = "not initialized -- call .setup() or access an attribute"


if __name__ == "__main__":
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]
    sys.exit(main())
