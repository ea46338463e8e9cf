"""The hostile-message corpus for test_hostile.py: whole Celery task messages (body, content type,
headers, properties) that a broken or malicious publisher could put on an omega|ml queue.

Each case is a function `ctx -> Publish` registered with `@case(...)`, which also states what the
worker must do with it (`expect`):

  FAILURE  a FAILURE result for the task id, with exception `exc` ("module.Name" or "Name") whose text
           contains `msg`; an ERROR/WARN log line naming the task id and containing `log`
  SUCCESS  the task ran normally (positive controls, e.g. a zlib-compressed body); `check` may inspect
           the result value
  EITHER   huge-but-legal inputs: a normal run or a FAILURE with `exc`, but some terminal result
  REVOKED  a REVOKED result (`expires` in the past)
  HELD     far-future ETA: no result, held unacked; the test revokes it and then expects REVOKED
  DROPPED  no task id can be known (a Redis element that is not JSON, or names no id): no result; a
           log line containing `log` (and the case's token where the line can carry one)
  DUP      the same task id published twice for a slow notebook: one run, one result

Every pickle payload that would execute code when loaded by CPython's pickle targets `ctx.marker(case)`
(a file that must never appear). Payloads are generated here from `__reduce__` objects (so they are
exactly what CPython emits) or written opcode by opcode where CPython cannot produce them.
"""
import base64
import copyreg
import datetime
import functools
import json
import operator
import os
import pickle
import random
import subprocess
import zlib
from dataclasses import dataclass, field

PING = "omegaml.tasks.omega_ping"
JOB = "omegaml.notebook.tasks.run_omegaml_job"
PICKLE_CT = "application/x-python-serialize"
JSON_CT = "application/json"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
DROP = object()  # header value: remove this default header

DECODE = "kombu.exceptions.DecodeError"
DISALLOWED = "kombu.exceptions.ContentDisallowed"
INVALID = "celery.exceptions.InvalidTaskError"


@dataclass
class Publish:
    """What to publish. `via`: 'kombu' (kombu Producer, the default), 'raw' (properties kombu would
    rewrite: py-amqp basic_publish on RabbitMQ, a hand-built kombu envelope on Redis), 'redis-raw' (LPUSH of `raw` verbatim: Redis only)."""
    body: bytes = b""
    content_type: object = PICKLE_CT
    content_encoding: str = "binary"
    task: object = PING
    headers: dict = field(default_factory=dict)
    correlation_id: object = "<tid>"  # '<tid>' = the case's task id; None = no correlation_id
    via: str = "kombu"
    raw: bytes = b""
    times: int = 1


@dataclass
class Case:
    name: str
    build: object
    expect: str
    exc: str = None
    msg: str = None
    log: str = None
    brokers: tuple = ("amqp", "redis")
    check: object = None
    needs: str = None  # a notebook the module fixture creates first: 'slow', 'notjson', 'big'
    code: object = False  # 'live': CPython's pickle.loads here would run the marker command; True: elsewhere
    has_id: bool = True
    xfail: dict = None  # broker -> reason: a known om-worker bug (strict xfail: fixing it turns the test red)


CASES = []


def case(name, expect, exc=None, msg=None, log=None, brokers=("amqp", "redis"), check=None, needs=None,
         code=False, has_id=True, xfail=None):
    def deco(fn):
        CASES.append(Case(name, fn, expect, exc, msg, log, tuple(brokers), check, needs, code, has_id, xfail))
        return fn
    return deco


class Ctx:
    """Per broker run: marker paths, notebook names, the task id being built."""

    def __init__(self, marker_dir, notebooks):
        self.marker_dir = marker_dir
        self.nb = notebooks
        self.tid = None
        self.name = None

    def marker(self):
        return str(self.marker_dir / f"pwned-{self.name}")

    def touch(self):
        return f"touch {self.marker()}"


# ------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------

class R:
    """Pickles as REDUCE(func, args): what an attacker's object with __reduce__ produces."""

    def __init__(self, func, args):
        self.func, self.args = func, tuple(args)

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args):  # pickle wants the reduce callable to be callable; never called here
        raise RuntimeError("not for calling")


def v2(args=(1, 2), kwargs=None, embed=EMBED, protocol=4):
    return pickle.dumps((tuple(args), {"a": 1} if kwargs is None else kwargs, embed), protocol=protocol)


def jv2(args=(1, 2), kwargs=None, embed=EMBED):
    return json.dumps([list(args), {"a": 1} if kwargs is None else kwargs, embed]).encode()


def sbu(s):
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def sg(module, name):
    return sbu(module) + sbu(name) + b"\x93"


def p4(ops):
    return b"\x80\x04" + ops + b"."


def in_args(ops):
    """A protocol-4 v2 body ((<ops>,), {}, {}) around a gadget that leaves one object on the stack."""
    return b"\x80\x04((" + ops + b"t}}t."


def text0(s):
    """protocol-0 STRING argument."""
    return b"S'" + s.encode() + b"'\n"


def pickled(obj, protocol, where="top"):
    if where == "top":
        return pickle.dumps(obj, protocol=protocol)
    return pickle.dumps(((obj,), {}, EMBED), protocol=protocol)


def ping_ok(value, args=(1, 2)):
    assert isinstance(value, dict) and value.get("message") == "ping return message", repr(value)[:300]
    assert list(value.get("args") or []) == list(args), repr(value)[:300]


# ------------------------------------------------------------------------------------------------
# 1. bad pickle
# ------------------------------------------------------------------------------------------------

@case("pickle_truncated", "FAILURE", DECODE, "truncated")
def _(ctx):
    b = v2()
    return Publish(b[: len(b) // 2])


@case("pickle_garbage", "FAILURE", DECODE, "cannot unpickle body")
def _(ctx):
    rnd = random.Random(7)
    return Publish(bytes([0x80, 0x04]) + bytes(rnd.randrange(256) for _ in range(4096)))


@case("pickle_only_proto", "FAILURE", DECODE, "truncated")
def _(ctx):
    return Publish(b"\x80\x04")


@case("pickle_no_stop", "FAILURE", DECODE, "truncated")
def _(ctx):
    return Publish(v2()[:-1])


@case("pickle_empty_body", "FAILURE", DECODE, "empty")
def _(ctx):
    return Publish(b"")


@case("pickle_protocol_6", "FAILURE", DECODE, "unsupported pickle protocol 6")
def _(ctx):
    return Publish(b"\x80\x06" + v2()[2:])


@case("pickle_protocol_255", "FAILURE", DECODE, "unsupported pickle protocol 255")
def _(ctx):
    return Publish(b"\x80\xff" + v2()[2:])


@case("pickle_invalid_opcode", "FAILURE", DECODE, "invalid pickle opcode")
def _(ctx):
    return Publish(p4(b"\xff"))


@case("pickle_binunicode8_2pow60", "FAILURE", DECODE, "truncated")
def _(ctx):
    return Publish(p4(b"\x8d" + (1 << 60).to_bytes(8, "little") + b"abc"))


@case("pickle_binunicode_4gib", "FAILURE", DECODE, "truncated")
def _(ctx):
    return Publish(p4(b"X" + b"\xff\xff\xff\xff" + b"abc"))


@case("pickle_binbytes8_2pow63", "FAILURE", DECODE, "truncated")
def _(ctx):
    return Publish(p4(b"\x8e" + ((1 << 63) - 1).to_bytes(8, "little") + b"abc"))


@case("pickle_frame_2pow62", "FAILURE", DECODE, "cannot unpickle body")
def _(ctx):
    return Publish(b"\x80\x04\x95" + (1 << 62).to_bytes(8, "little") + v2()[11:])


@case("pickle_long4_huge_length", "FAILURE", DECODE, "cannot unpickle body")
def _(ctx):
    return Publish(p4(b"\x8b" + b"\xff\xff\xff\x7f" + b"\x01" * 16))


@case("pickle_long4_100k_integer", "FAILURE", DECODE, "cannot unpickle body")
def _(ctx):
    return Publish(p4(b"\x8b" + (100_000).to_bytes(4, "little") + b"\x01" * 100_000))


@case("pickle_memo_get_missing", "FAILURE", DECODE, "memo")
def _(ctx):
    return Publish(p4(b"]\x94j\xff\xff\xff\xff"))


@case("pickle_memo_flood_2m", "FAILURE", DECODE, "limit")
def _(ctx):
    # 2M MEMOIZE of one object: memo bound (or element bound), not 2M hash entries held
    return Publish(p4(b"]" + b"\x94" * 2_000_000))


@case("pickle_billion_laughs", "FAILURE", DECODE, "limit")
def _(ctx):
    ops = b"]\x94"  # memo 0 = []
    for i in range(1, 65):  # memo i = [memo i-1, memo i-1]
        ops += b"(" + b"j" + (i - 1).to_bytes(4, "little") + b"j" + (i - 1).to_bytes(4, "little") + b"l\x94"
    return Publish(p4(ops))


@case("pickle_recursive_list", "FAILURE", DECODE, "recursive")
def _(ctx):
    lst = []
    lst.append(lst)
    return Publish(pickle.dumps(((lst,), {}, EMBED), protocol=4))


@case("pickle_nested_100k", "FAILURE", DECODE, "limit")
def _(ctx):
    n = 100_000
    return Publish(p4(b"]" * n + b"a" * (n - 1)))


@case("pickle_100k_marks", "FAILURE", DECODE, "limit")
def _(ctx):
    return Publish(p4(b"(" * 100_000))


@case("pickle_nested_400_in_args", "FAILURE", DECODE, "limit")
def _(ctx):
    x = None
    for _ in range(400):
        x = [x]
    return Publish(v2(args=(x,)))


@case("pickle_lone_surrogate_arg", "FAILURE", DECODE, "lone surrogates")
def _(ctx):
    # what CPython writes for a str holding a surrogate-escaped byte (e.g. an undecodable file name)
    return Publish(v2(args=("file-\udcff.csv",)))


@case("json_lone_surrogate_arg", "FAILURE", DECODE, "surrogate")
def _(ctx):
    return Publish(json.dumps([["file-\udcff.csv"], {}, EMBED]).encode(), JSON_CT, "utf-8")


@case("pickle_non_utf8_str", "FAILURE", DECODE, "invalid string data")
def _(ctx):
    return Publish(in_args(b"X\x02\x00\x00\x00\xff\xfe"))


@case("pickle_persid", "FAILURE", DECODE, "PERSID")
def _(ctx):
    return Publish(b"(P" + ctx.touch().encode() + b"\ntt}}t.")


@case("pickle_ext1_copyreg_registry", "FAILURE", DECODE, "EXT1")
def _(ctx):
    return Publish(in_args(b"\x82\x01"))


@case("pickle_next_buffer_protocol5", "FAILURE", DECODE, "NEXT_BUFFER")
def _(ctx):
    return Publish(b"\x80\x05((\x97t}}t.")


@case("pickle_build_on_object", "FAILURE", DECODE, "cannot unpickle body")
def _(ctx):
    # object() then BUILD({'__class__': 'os'}): the state-setting trick on an allow-listed class
    return Publish(in_args(sg("builtins", "object") + b")R}" + sbu("__class__") + sbu("os") + b"sb"))


@case("pickle_bytes_of_2pow40", "FAILURE", DECODE, "cannot unpickle body")
def _(ctx):
    # allow-listed builtins.bytes called with an int: CPython would allocate 1 TiB of zeros
    return Publish(pickle.dumps(((R(bytes, (1 << 40,)),), {}, EMBED), protocol=4))


@case("pickle_bytearray_of_2pow40", "FAILURE", DECODE, "cannot unpickle body")
def _(ctx):
    return Publish(pickle.dumps(((R(bytearray, (1 << 40,)),), {}, EMBED), protocol=4))


@case("pickle_reconstructor_non_uuid", "FAILURE", DECODE, "cannot unpickle body")
def _(ctx):
    return Publish(pickled(R(copyreg._reconstructor, (datetime.date, object, None)), 2, "args"))


@case("pickle_datetime_bad_state", "FAILURE", DECODE, "cannot unpickle body")
def _(ctx):
    return Publish(in_args(sg("datetime", "datetime") + b"C\x03abc\x85R"))


# ------------------------------------------------------------------------------------------------
# 2. forbidden globals: each would run `touch <marker>` (or write the marker) under pickle.loads
# ------------------------------------------------------------------------------------------------

def _forbidden(name, expected_global, live=True):
    """`expected_global` as the error names it; a tuple = substrings that must all appear. `live`: CPython's
    pickle.loads on this machine would run the marker command (test_code_payloads_are_live checks it)."""
    msg = expected_global if isinstance(expected_global, tuple) else f"forbidden pickle global '{expected_global}'"

    def deco(fn):
        return case(name, "FAILURE", DECODE, msg, code="live" if live else True)(fn)
    return deco


for _proto in (0, 1, 2, 3, 4, 5):
    def _mk(proto):
        @_forbidden(f"os_system_protocol_{proto}_top", "posix.system")
        def _(ctx):
            return Publish(pickled(R(os.system, (ctx.touch(),)), proto))

        @_forbidden(f"os_system_protocol_{proto}_in_args", "posix.system")
        def _(ctx):
            return Publish(pickled(R(os.system, (ctx.touch(),)), proto, "args"))
    _mk(_proto)


@_forbidden("posix_system_stack_global", "posix.system")
def _(ctx):
    return Publish(in_args(sg("posix", "system") + sbu(ctx.touch()) + b"\x85R"))


@_forbidden("nt_system_protocol_0", "nt.system", live=False)  # Windows' os.system
def _(ctx):
    return Publish(b"((cnt\nsystem\n(" + text0(ctx.touch()) + b"tRtt(dp0\n(dp1\nt.")


@_forbidden("os_popen", "os.popen")
def _(ctx):
    return Publish(pickled(R(os.popen, (ctx.touch(),)), 4, "args"))


@_forbidden("subprocess_call", "subprocess.call")
def _(ctx):
    return Publish(pickled(R(subprocess.call, (["touch", ctx.marker()],)), 4, "args"))


@_forbidden("subprocess_check_output", "subprocess.check_output")
def _(ctx):
    return Publish(pickled(R(subprocess.check_output, (["touch", ctx.marker()],)), 3, "args"))


@_forbidden("subprocess_popen", ("forbidden pickle global", "Popen'"))  # protocol 2 writes commands.Popen
def _(ctx):
    return Publish(pickled(R(subprocess.Popen, (["touch", ctx.marker()],)), 2, "top"))


@_forbidden("builtins_eval", "builtins.eval")
def _(ctx):
    return Publish(pickled(R(eval, (f"__import__('os').system({ctx.touch()!r})",)), 4, "args"))


@_forbidden("builtins_exec", "builtins.exec")
def _(ctx):
    return Publish(pickled(R(exec, (f"import os; os.system({ctx.touch()!r})",)), 4, "top"))


@_forbidden("py2_builtin_eval_protocol_0", "builtins.eval")
def _(ctx):
    src = f"__import__('os').system({ctx.touch()!r})".replace("'", '"')
    return Publish(b"c__builtin__\neval\n(" + text0(src) + b"tR.")


@_forbidden("builtins_import_then_getattr", "builtins.__import__")
def _(ctx):
    ops = (sg("builtins", "__import__") + sbu("os") + b"\x85R" + b"\x94"  # os
           + sg("builtins", "getattr") + b"h\x00" + sbu("system") + b"\x86R"  # getattr(os, 'system')
           + sbu(ctx.touch()) + b"\x85R")
    return Publish(in_args(ops))


@_forbidden("getattr_chain", "builtins.getattr")
def _(ctx):
    return Publish(pickled(R(R(getattr, (R(__import__, ("os",)), "system")), (ctx.touch(),)), 4, "args"))


@_forbidden("operator_methodcaller", "operator.methodcaller")
def _(ctx):
    mc = operator.methodcaller("system", ctx.touch())
    return Publish(pickled(R(mc, (R(__import__, ("os",)),)), 4, "args"))


@_forbidden("functools_partial_build", "functools.partial")
def _(ctx):
    # partial pickles as REDUCE + BUILD(state): the BUILD opcode carries os.system and its args
    return Publish(pickled(R(functools.partial(os.system, ctx.touch()), ()), 4, "args"))


@_forbidden("copyreg_reconstructor_popen", ("forbidden pickle global", "Popen'"))
def _(ctx):
    # _reconstructor(Popen, Popen, argv): Popen.__new__ then Popen.__init__(obj, argv) = runs argv
    return Publish(pickled(R(copyreg._reconstructor, (subprocess.Popen, subprocess.Popen,
                                                      ["touch", ctx.marker()])), 2, "args"))


@_forbidden("inst_opcode_os_system", "os.system")
def _(ctx):
    return Publish(b"((" + text0(ctx.touch()) + b"ios\nsystem\ntt(dp0\n(dp1\nt.")


@_forbidden("obj_opcode_os_system", "os.system")
def _(ctx):
    return Publish(b"(((cos\nsystem\n" + text0(ctx.touch()) + b"ott(dp0\n(dp1\nt.")


@_forbidden("newobj_popen", "subprocess.Popen", live=False)  # NEWOBJ only calls __new__
def _(ctx):
    ops = b"csubprocess\nPopen\n]X" + len(ctx.touch()).to_bytes(4, "little") + ctx.touch().encode() + b"a\x85\x81"
    return Publish(b"\x80\x02((" + ops + b"t}}t.")


@_forbidden("newobj_ex_popen", "subprocess.Popen", live=False)
def _(ctx):
    ops = sg("subprocess", "Popen") + b"]" + sbu("touch") + b"a" + sbu(ctx.marker()) + b"a\x85}\x92"
    return Publish(in_args(ops))


@_forbidden("nested_pickle_loads", "_pickle.loads")
def _(ctx):
    inner = pickle.dumps(R(os.system, (ctx.touch(),)), protocol=4)
    return Publish(pickled(R(pickle.loads, (inner,)), 4, "args"))


@_forbidden("io_open_write", "io.open")
def _(ctx):
    return Publish(pickled(R(open, (ctx.marker(), "w")), 4, "args"))


@_forbidden("forbidden_global_in_kwargs", "posix.system")
def _(ctx):
    return Publish(pickle.dumps(((), {"x": R(os.system, (ctx.touch(),))}, EMBED), protocol=4))


@_forbidden("forbidden_global_in_embed", "posix.system")
def _(ctx):
    return Publish(pickle.dumps(((), {}, {"callbacks": [R(os.system, (ctx.touch(),))]}), protocol=4))


@case("v1_body_reduce_in_args", "FAILURE", DECODE, "forbidden pickle global 'posix.system'", code="live")
def _(ctx):
    body = {"task": PING, "id": ctx.tid, "args": (R(os.system, (ctx.touch(),)),), "kwargs": {}}
    return Publish(pickle.dumps(body, protocol=2), task=None, headers={k: DROP for k in V2_HEADER_KEYS})


# ------------------------------------------------------------------------------------------------
# 3. JSON bodies
# ------------------------------------------------------------------------------------------------

def json_case(name, exc, msg, body):
    """A FAILURE case publishing the fixed `body` as application/json (utf-8)."""
    case(name, "FAILURE", exc, msg)(lambda ctx: Publish(body, JSON_CT, "utf-8"))


json_case("json_nested_100k", DECODE, "recursion limit", b"[" * 100_000 + b"]" * 100_000)
json_case("json_nested_200_in_args", DECODE, "recursion limit", b"[[" + b"[" * 200 + b"]" * 200 + b"], {}, {}]")
json_case("json_non_utf8_bytes", DECODE, "cannot decode JSON body", b'[["\xff\xfe\xc3("], {}, {}]')
json_case("json_truncated", DECODE, "cannot decode JSON body", jv2()[:-5])
json_case("json_unknown_type_wrapper", DECODE, "cannot decode JSON body",
          b'[[{"__type__": "os.system", "__value__": "touch x"}], {}, {}]')
json_case("json_body_four_elements", INVALID, "3 elements", b"[[], {}, {}, 4]")
json_case("json_kwargs_not_dict", INVALID, "kwargs", b"[[], [1], {}]")
json_case("json_embed_is_string", INVALID, "embed", b'[[], {}, "chain"]')
json_case("json_hybrid_dict_without_args", INVALID, "without 'args'", b'{"kwargs": {}}')


@case("pickle_kwargs_int_keys", "FAILURE", INVALID, "str keys")
def _(ctx):
    return Publish(pickle.dumps(((), {1: 2}, EMBED), protocol=4))


@case("pickle_content_type_json_body", "FAILURE", DECODE, "cannot unpickle body")
def _(ctx):
    return Publish(jv2())


json_case("json_content_type_pickle_body", DECODE, "cannot decode JSON body", v2())


# ------------------------------------------------------------------------------------------------
# 4. content types
# ------------------------------------------------------------------------------------------------

@case("content_type_yaml", "FAILURE", DISALLOWED, "application/x-yaml")
def _(ctx):
    return Publish(b"- [1, 2]\n- {}\n- {}\n", "application/x-yaml", "utf-8")


@case("content_type_text_plain", "FAILURE", DISALLOWED, "text/plain")
def _(ctx):
    return Publish(jv2(), "text/plain", "utf-8")


@case("content_type_msgpack", "FAILURE", DISALLOWED, "application/x-msgpack")
def _(ctx):
    return Publish(b"\x93\x92\x01\x02\x81\xa1a\x01\x80", "application/x-msgpack", "binary")


@case("content_type_empty_string", "FAILURE", DISALLOWED, "not accepted")
def _(ctx):
    return Publish(v2(), "", via="raw")


@case("content_type_absent", "FAILURE", DISALLOWED, "no content_type")
def _(ctx):
    return Publish(v2(), None, via="raw")


# ------------------------------------------------------------------------------------------------
# 5. compression
# ------------------------------------------------------------------------------------------------

@case("compression_zlib_control", "SUCCESS", check=ping_ok)
def _(ctx):
    return Publish(zlib.compress(v2()), headers={"compression": "application/x-gzip"})


@case("compression_gzip_header_garbage_body", "FAILURE", DECODE, "cannot decompress body")
def _(ctx):
    return Publish(v2(), headers={"compression": "application/x-gzip"})


def _zlib_bomb(size=256 << 20):
    c = zlib.compressobj(9)
    chunk = b"\0" * (1 << 20)
    out = [c.compress(chunk) for _ in range(size >> 20)]
    out.append(c.flush())
    return b"".join(out)


@case("compression_zlib_bomb_256mib", "FAILURE", DECODE, "exceeds")
def _(ctx):
    return Publish(_zlib_bomb(), headers={"compression": "application/x-gzip"})


@case("compression_unknown_name", "FAILURE", DISALLOWED, "unsupported compression")
def _(ctx):
    return Publish(zlib.compress(v2()), headers={"compression": "application/x-omw-nonesuch"})


@case("compression_bz2_control", "SUCCESS", check=ping_ok)
def _(ctx):
    import bz2  # kombu registers bz2 and lzma too: the Python worker decodes them (issue 13 item 8)
    return Publish(bz2.compress(v2()), headers={"compression": "application/x-bz2"})


@case("compression_xz_bomb_80mib", "FAILURE", DECODE, "exceeds")
def _(ctx):
    import lzma
    return Publish(lzma.compress(b"\0" * (80 << 20), preset=0), headers={"compression": "application/x-lzma"})


@case("compression_brotli_not_supported", "FAILURE", DISALLOWED, "unsupported compression")
def _(ctx):
    return Publish(b"\x0b\x02\x80hello\x03", headers={"compression": "application/x-brotli"})


@case("compression_header_is_int", "FAILURE", INVALID, "compression")
def _(ctx):
    return Publish(v2(), headers={"compression": 9})


# ------------------------------------------------------------------------------------------------
# 6. headers
# ------------------------------------------------------------------------------------------------

V2_HEADER_KEYS = ("lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
                  "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result",
                  "replaced_task_nesting", "stamped_headers", "stamps")


@case("header_task_missing", "FAILURE", INVALID, "not a Celery task message")
def _(ctx):
    return Publish(v2(), task=None)


@case("header_task_is_int", "FAILURE", INVALID, "invalid field \"task\"")
def _(ctx):
    return Publish(v2(), task=42)


@case("header_task_empty", "FAILURE", INVALID, "non-empty task name")
def _(ctx):
    return Publish(v2(), task="")


@case("header_task_unknown_name", "FAILURE", "celery.exceptions.NotRegistered", "posix.system")
def _(ctx):
    return Publish(v2(), task="posix.system")


@case("header_task_non_utf8", "FAILURE", INVALID, "invalid field \"task\"")
def _(ctx):
    return Publish(v2(), task=b"omegaml.tasks.\xff\xfe")


@case("header_id_is_int", "FAILURE", INVALID, "invalid field \"id\"")
def _(ctx):
    return Publish(v2(), headers={"id": 12345})


@case("header_id_is_list", "FAILURE", INVALID, "invalid field \"id\"")
def _(ctx):
    return Publish(v2(), headers={"id": ["a", "b"]})


@case("header_id_non_utf8", "FAILURE", INVALID, "invalid field \"id\"")
def _(ctx):
    return Publish(v2(), headers={"id": b"\xff\xfe\xfd"})


@case("header_id_missing_no_correlation", "DROPPED", log="task message has no id", has_id=False)
def _(ctx):
    return Publish(v2(), headers={"id": DROP}, correlation_id=None)


@case("header_id_int_no_correlation", "DROPPED", log="invalid field \"id\"", has_id=False)
def _(ctx):
    return Publish(v2(), headers={"id": 7}, correlation_id=None)


@case("header_argsrepr_100k", "SUCCESS", check=ping_ok)
def _(ctx):
    return Publish(v2(), headers={"argsrepr": "(" + "x" * 100_000 + ")"})


@case("header_argsrepr_non_utf8", "FAILURE", INVALID, "argsrepr")
def _(ctx):
    return Publish(v2(), headers={"argsrepr": b"(\xff\xfe)"})


@case("header_timelimit_string", "FAILURE", INVALID, "timelimit")
def _(ctx):
    return Publish(v2(), headers={"timelimit": "forever"})


@case("header_timelimit_negative", "FAILURE", INVALID, "timelimit")
def _(ctx):
    return Publish(v2(), headers={"timelimit": [-1, None]})


@case("header_retries_string", "FAILURE", INVALID, "retries")
def _(ctx):
    return Publish(v2(), headers={"retries": "many"})


@case("header_eta_unparsable", "FAILURE", INVALID, "eta")
def _(ctx):
    return Publish(v2(), headers={"eta": "the twelfth of never"})


@case("header_eta_year_275760", "FAILURE", INVALID, "eta")
def _(ctx):
    return Publish(v2(), headers={"eta": "+275760-09-13T00:00:00+00:00"})


# A header nested past 128 levels is read as None on both brokers (RabbitMQ field tables and kombu's
# Redis envelope alike) and the task runs.
@case("header_nested_tables_150", "SUCCESS", check=ping_ok)
def _(ctx):
    x = {"leaf": 1}
    for _ in range(150):
        x = {"n": x}
    return Publish(v2(), headers={"omw_nested": x})


# -- protocol v1 (body dict, no task header) ----------------------------------------------------

@case("v1_control", "SUCCESS", check=ping_ok)
def _(ctx):
    body = {"task": PING, "id": ctx.tid, "args": (1, 2), "kwargs": {"a": 1}, "retries": 0, "eta": None}
    return Publish(pickle.dumps(body, protocol=2), task=None, headers={k: DROP for k in V2_HEADER_KEYS})


@case("v1_task_is_int", "FAILURE", INVALID, "invalid field \"task\"")
def _(ctx):
    body = {"task": 5, "id": ctx.tid, "args": (), "kwargs": {}}
    return Publish(pickle.dumps(body, protocol=2), task=None, headers={k: DROP for k in V2_HEADER_KEYS})


@case("v1_dict_without_task", "FAILURE", INVALID, "not a Celery task message")
def _(ctx):
    body = {"id": ctx.tid, "args": (), "kwargs": {}}
    return Publish(json.dumps(body).encode(), JSON_CT, "utf-8", task=None,
                   headers={k: DROP for k in V2_HEADER_KEYS})


@case("v1_args_is_string", "FAILURE", INVALID, "args")
def _(ctx):
    body = {"task": PING, "id": ctx.tid, "args": "rm -rf /", "kwargs": {}}
    return Publish(json.dumps(body).encode(), JSON_CT, "utf-8", task=None,
                   headers={k: DROP for k in V2_HEADER_KEYS})


@case("v1_eta_garbage", "FAILURE", INVALID, "eta")
def _(ctx):
    body = {"task": PING, "id": ctx.tid, "args": [], "kwargs": {}, "eta": "soon"}
    return Publish(json.dumps(body).encode(), JSON_CT, "utf-8", task=None,
                   headers={k: DROP for k in V2_HEADER_KEYS})


# -- Redis: list elements that are not kombu envelopes ------------------------------------------

def _env(ctx, **over):
    env = {"headers": {"omw_token": ctx.tid, "task": PING, "id": ctx.tid},
           "body": base64.b64encode(v2()).decode(), "content-encoding": "binary", "content-type": PICKLE_CT,
           "properties": {"correlation_id": ctx.tid, "delivery_mode": 2,
                          "delivery_info": {"exchange": "", "routing_key": "<q>"}, "priority": 0,
                          "body_encoding": "base64", "delivery_tag": f"tag-{ctx.tid}"}}
    env.update(over)
    return env


@case("redis_element_not_json", "DROPPED", log="not a kombu envelope", brokers=("redis",))
def _(ctx):
    return Publish(via="redis-raw", raw=f"omw {ctx.tid} ".encode() + b"\xff\xfe{not json")


@case("redis_headers_not_a_table", "FAILURE", DECODE, "unreadable broker message", log="unreadable broker message",
      brokers=("redis",))
def _(ctx):
    env = _env(ctx)
    return Publish(via="redis-raw",
                   raw=json.dumps({"headers": [ctx.tid, "task", PING], **{k: v for k, v in env.items()
                                                                         if k != "headers"}}).encode())


@case("redis_headers_nested_100k", "DROPPED", log="not a kombu envelope", brokers=("redis",))
def _(ctx):
    return Publish(via="redis-raw", raw=(f'{{"token": "{ctx.tid}", "headers": ' + "[" * 100_000
                                         + "]" * 100_000 + "}").encode())


@case("redis_non_utf8_in_header_value", "DROPPED", log="not a kombu envelope", brokers=("redis",))
def _(ctx):
    raw = json.dumps(_env(ctx)).encode()
    return Publish(via="redis-raw", raw=raw.replace(b'"omw_token": ', b'"omw_bad": "\xff\xfe", "omw_token": ', 1))


@case("redis_lone_surrogate_in_header", "FAILURE", DECODE, "lone leading surrogate", log="unreadable broker message",
      brokers=("redis",))
def _(ctx):
    env = _env(ctx)
    env["headers"]["argsrepr"] = "\udcff"
    return Publish(via="redis-raw", raw=json.dumps(env).encode())


@case("redis_unknown_type_wrapper_in_headers", "FAILURE", DECODE, "unreadable broker message", log="unreadable broker message",
      brokers=("redis",))
def _(ctx):
    env = _env(ctx)
    env["headers"]["argsrepr"] = {"__type__": "os.system", "__value__": "touch x"}
    return Publish(via="redis-raw", raw=json.dumps(env).encode())


@case("redis_body_bad_base64", "FAILURE", DECODE, "unreadable broker message", log="unreadable broker message",
      brokers=("redis",))
def _(ctx):
    return Publish(via="redis-raw", raw=json.dumps(_env(ctx, body="!!not base64!!")).encode())


@case("redis_no_delivery_tag", "FAILURE", DECODE, "unreadable broker message", log="unreadable broker message",
      brokers=("redis",))
def _(ctx):
    env = _env(ctx)
    del env["properties"]["delivery_tag"]
    return Publish(via="redis-raw", raw=json.dumps(env).encode())


# ------------------------------------------------------------------------------------------------
# 7. huge arguments
# ------------------------------------------------------------------------------------------------

def _big_str_ok(value):
    ping_ok(value, args=value.get("args") if isinstance(value, dict) else ())
    assert len(value["args"][0]) == 20 * 1024 * 1024


@case("ping_arg_20mib_string", "EITHER", DECODE, check=_big_str_ok)
def _(ctx):
    return Publish(v2(args=("x" * (20 * 1024 * 1024),)))


@case("ping_arg_1m_element_list", "EITHER", DECODE)
def _(ctx):
    return Publish(v2(args=(list(range(1_000_000)),)))


@case("ping_arg_huge_decimal_exponent", "SUCCESS")
def _(ctx):
    import decimal
    return Publish(v2(args=(decimal.Decimal("1e999999999"),)))


# ------------------------------------------------------------------------------------------------
# 8. run_omegaml_job with wrong arguments and hostile notebook names
# ------------------------------------------------------------------------------------------------

def _job(args, kwargs=None):
    return Publish(v2(args=args, kwargs=kwargs or {}), task=JOB)


@case("job_nb_file_int", "FAILURE", "TypeError", "nb_file must be str, not int")
def _(ctx):
    return _job((42,))


@case("job_nb_file_none", "FAILURE", "TypeError", "nb_file must be str, not NoneType")
def _(ctx):
    return _job((None,))


@case("job_nb_file_list", "FAILURE", "TypeError", "nb_file must be str, not list")
def _(ctx):
    return _job((["a.ipynb"],))


@case("job_nb_file_dict", "FAILURE", "TypeError", "nb_file must be str, not dict")
def _(ctx):
    return _job(({"name": "a.ipynb"},))


@case("job_no_args", "FAILURE", "TypeError", "missing 1 required positional argument")
def _(ctx):
    return _job(())


@case("job_timeout_string", "FAILURE", "TypeError", "timeout must be a positive number")
def _(ctx):
    return _job(("nonexistent-nb",), {"timeout": "ten minutes"})


@case("job_timeout_1e308", "FAILURE", "AssertionError", "Cannot run non-existent jobs omw-no-such-nb-t")
def _(ctx):
    # issue 13: Duration::from_secs_f64(1e308) panicked (FAILURE "cannot convert float seconds")
    return _job(("omw-no-such-nb-t",), {"timeout": 1e308})


@case("job_timeout_inf_positional", "FAILURE", "TypeError", "timeout must be a positive number")
def _(ctx):
    return _job(("omw-no-such-nb-t", None, float("inf")))


@case("job_extra_positional_args", "FAILURE", "TypeError", "takes from 1 to 3 positional arguments")
def _(ctx):
    return _job(("a", None, None, "x", "y"))


@case("job_bucket_int", "FAILURE", "TypeError", "__bucket must be str or None")
def _(ctx):
    return _job(("a",), {"__bucket": 5})


@case("job_unknown_kwargs_nonexistent", "FAILURE", "AssertionError", "Cannot run non-existent jobs omw-no-such-nb")
def _(ctx):
    return _job(("omw-no-such-nb",), {"bogus": 1, "__weird": [1]})


for _nb in ("../../etc/passwd", "/etc/passwd", "tasks/../x", "..", "/", "jobs/../../../../tmp/x\x00y"):
    def _mk(nb):
        @case(f"job_path_{nb.strip('/').replace('/', '_').replace('.', 'dot').replace(chr(0), 'NUL') or 'root'}",
              "FAILURE", "AssertionError", f"Cannot run non-existent jobs {nb}")
        def _(ctx):
            return _job((nb,))
    _mk(_nb)


@case("job_notebook_not_json", "FAILURE", "NotJSONError", "is not a valid notebook", needs="notjson")
def _(ctx):
    return _job((ctx.nb["notjson"],))


@case("job_notebook_50mib", "SUCCESS", needs="big")
def _(ctx):
    return _job((ctx.nb["big"],))


@case("job_duplicate_task_id", "DUP", needs="slow")
def _(ctx):
    return Publish(v2(args=(ctx.nb["slow"],), kwargs={}), task=JOB, times=2)


# ------------------------------------------------------------------------------------------------
# 9. ETA / expires
# ------------------------------------------------------------------------------------------------

@case("expires_in_the_past_iso", "REVOKED")
def _(ctx):
    return Publish(v2(), headers={"expires": "2001-01-01T00:00:00+00:00"})


@case("expires_in_the_past_datetime_header", "REVOKED")
def _(ctx):
    return Publish(v2(), headers={"expires": datetime.datetime(2001, 1, 1, tzinfo=datetime.timezone.utc)})


@case("expires_past_job", "REVOKED")
def _(ctx):
    return Publish(v2(args=("../../etc/passwd",), kwargs={}), task=JOB, headers={"expires": "1999-12-31T23:59:59"})


@case("eta_in_the_past", "SUCCESS", check=ping_ok)
def _(ctx):
    return Publish(v2(), headers={"eta": "1970-01-01T00:00:00+00:00"})


@case("eta_year_9999", "HELD")
def _(ctx):
    return Publish(v2(), headers={"eta": "9999-12-31T23:59:59.999999+00:00"})


@case("eta_countdown_1e9_seconds", "HELD")
def _(ctx):
    eta = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=10**9)
    return Publish(v2(), headers={"eta": eta.isoformat()})
