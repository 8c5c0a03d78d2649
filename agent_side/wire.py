"""The one wire format, shared by the agent side and the monitor.

A frame is a ZeroMQ multipart message: a small msgpack header, then raw array buffers.
No pickle, no per-element encoding.

``act`` frame: activation rows of one tap.
    header: v, kind="act", run, pub, seq, t, drops, tap, dtype, shape=[rows, width], lead
    parts:  header, data (rows*width*itemsize bytes), pos (rows*2 int64: step, index)
``met`` frame: metric rows (observation components, action, reward, user metrics).
    header: v, kind="met", run, pub, seq, t, drops, names, dtype="float64", shape=[rows, len(names)]
    parts:  header, data, pos
``ep`` frame: episodes that ended.
    header: v, kind="ep", run, pub, seq, t, drops, episodes=[[step, index, return, length, terminated, truncated], ...]
    parts:  header
``tok`` frame: the tokens of one language-model forward (one prompt, or a batch of equal length).
    header: v, kind="tok", run, pub, seq, t, drops, step, shape=[batch, tokens], [context, start]
    parts:  header, msgpack list of ``batch`` lists of ``tokens`` strings
    Each list may begin with ``context`` tokens that came before the forward (a generation step
    sees only its new token; its context is what it continues); ``start`` is the sequence position
    of the first token after them. Row ``b * (tokens - context) + t`` is ``tokens[b][context + t]``.
``ctl`` frame: what the agent's control end did (see :mod:`agent_side.control`).
    header: v, kind="ctl", run, pub, seq, t, drops, event={event: hello|applied|reverted|refused|synced, ...}
    parts:  header

The control channel runs the other way, monitor PUB -> agent SUB, one message per run:
    parts:  topic (run + NUL), msgpack {v, kind="steer", run, version, interventions=[Intervention.to_msg(), ...]}
    :func:`encode_control` / :func:`decode_control`; the agent derives the monitor's control
    endpoint from the data endpoint with :func:`control_endpoint` (port + 1).

``pos[:, 0]`` is the step of each row and ``pos[:, 1]`` its index inside that step's forward
(the env index of a vectorized env, or ``b * tokens + t`` for a language model), so activations
and metrics of the same step line up row by row.

Every limit is checked before anything is allocated; :func:`decode` either returns a
:class:`Frame` or raises :class:`WireError` with a short ``reason`` that the monitor counts.
What a frame may hold (:class:`Limits`), each bound refused under its own reason:

- ``bad_name`` / ``name_too_long``: run, pub, tap, metric names and steer ids are 1 to
  ``name_chars`` printable characters with no whitespace or other separator (so no NUL, no
  control character, no line break, no escape sequence); tokens are text and may hold anything.
- ``bad_seq``, ``bad_drops``, ``bad_unwatched``: integers in [0, ``count_max``].
- ``bad_step``: every step and index (``pos``, a token frame's step, an episode's step and
  index, a ctl event's step) in [0, ``count_max``].
- ``bad_time``: ``t`` a finite number of seconds since 1970, in [0, ``time_max``].
- ``non_finite`` (NaN or Inf) and ``out_of_range``: every value within +-``value_max``, so
  the monitor's float64 sums and float32 summaries stay finite; an episode's flags 0 or 1 and
  its length a count.

An optional header field ``unwatched`` (default 0) counts the steps the sender ran with no
monitor connected, so a run's rows + unwatched + drops account for its steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack
import numpy as np

__all__ = [
    "DEFAULT_ENDPOINT",
    "VERSION",
    "Frame",
    "ActFrame",
    "MetFrame",
    "EpFrame",
    "TokFrame",
    "CtlFrame",
    "WireError",
    "Limits",
    "encode_act",
    "encode_met",
    "encode_ep",
    "encode_tok",
    "encode_ctl",
    "decode",
    "ACT_DTYPES",
    "CTL_EVENTS",
    "Control",
    "control_topic",
    "control_endpoint",
    "encode_control",
    "decode_control",
    "CONTROL_MAX_BYTES",
    "CONTROL_MAX_STEERS",
    "name_problem",
]

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"  # where an agent sends and a monitor binds by default

VERSION = 1
ACT_DTYPES = ("float16", "float32", "float64")
_KINDS = ("act", "met", "ep", "tok", "ctl")
CTL_EVENTS = ("hello", "applied", "reverted", "refused", "synced")
# every field a ctl event may carry, with its type; anything else is refused
_CTL_FIELDS: dict[str, type | tuple[type, ...]] = {
    "event": str,
    "control": bool,
    "version": int,
    "step": int,
    "id": str,
    "op": str,
    "tap": str,
    "reason": str,
    "alpha": (int, float),
    "value": (int, float),
    "active": list,
    "unwatched": int,
}
_CTL_CHARS = 1024
CONTROL_MAX_BYTES = 4 * 1024 * 1024  # a control message body larger than this is refused before unpacking
CONTROL_MAX_STEERS = 64
CONTROL_MAX_WIDTH = 1 << 16


@dataclass(frozen=True)
class Limits:
    """Hard limits, checked before any allocation."""

    header_bytes: int = 64 * 1024
    rows: int = 1 << 20
    width: int = 1 << 20
    frame_bytes: int = 256 * 1024 * 1024
    name_chars: int = 256
    names: int = 4096
    episodes: int = 65536
    count_max: int = 1 << 53  # sequence numbers, drops, steps and indices (exact as a float64 and in JSON)
    value_max: float = 1e30  # |value| of an activation, metric or episode return
    time_max: float = 1e11  # seconds since 1970 (about year 5138)


DEFAULT_LIMITS = Limits()


class WireError(ValueError):
    """A frame that cannot be accepted; ``reason`` is a short counter name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class _Head:
    """What every frame carries: who sent it, its place in the sender's sequence, and when;
    ``drops`` and ``unwatched`` are the sender's running totals."""

    run: str
    pub: str
    seq: int
    t: float
    drops: int
    unwatched: int


@dataclass
class ActFrame(_Head):
    """Activations of one tap: ``data`` [rows, width], ``pos`` [rows, 2] int64 (step, index)."""

    tap: str
    data: np.ndarray
    pos: np.ndarray
    lead: list[int]  # the tap's leading dimensions before they were flattened into rows
    kind: ClassVar[str] = "act"

    @property
    def rows(self) -> int:
        return int(self.data.shape[0])


@dataclass
class MetFrame(_Head):
    """Metric rows: one float64 column per name, ``pos`` as for activations."""

    names: list[str]
    data: np.ndarray
    pos: np.ndarray
    kind: ClassVar[str] = "met"

    @property
    def rows(self) -> int:
        return int(self.data.shape[0])


@dataclass
class EpFrame(_Head):
    """Episode ends: rows of (step, index, return, length, terminated, truncated)."""

    episodes: list[list[float]]
    kind: ClassVar[str] = "ep"

    @property
    def rows(self) -> int:
        return len(self.episodes)


@dataclass
class TokFrame(_Head):
    """The tokens of one forward (``step``): ``tokens[b][context + t]`` is row ``b * T + t``, at
    sequence position ``start + t``; the first ``context`` tokens of each list precede it."""

    step: int
    tokens: list[list[str]]
    context: int
    start: int
    kind: ClassVar[str] = "tok"

    @property
    def rows(self) -> int:
        return len(self.tokens) * (len(self.tokens[0]) - self.context)


@dataclass
class CtlFrame(_Head):
    """A control-plane event from the agent (hello, applied, reverted, refused, synced)."""

    event: dict[str, Any]
    kind: ClassVar[str] = "ctl"

    @property
    def rows(self) -> int:
        return 0


Frame = ActFrame | MetFrame | EpFrame | TokFrame | CtlFrame  # what decode() returns: one type per kind
_HeadFields = tuple[str, str, int, float, int, int]  # _Head's fields, in order


def _header(kind: str, run: str, pub: str, seq: int, drops: int, **extra: Any) -> bytes:
    h = {"v": VERSION, "kind": kind, "run": run, "pub": pub, "seq": seq, "t": time.time(), "drops": drops}
    h.update(extra)
    return msgpack.packb(h, use_bin_type=True)


def name_problem(name: Any, limit: int = 256) -> str | None:
    """Why ``name`` cannot be a run, pub, tap or metric name (``bad_name`` / ``name_too_long``), or None."""
    if not isinstance(name, str) or not name:
        return "bad_name"
    if len(name) > limit:
        return "name_too_long"
    # isprintable() is False for Unicode's Other (control, format, NUL...) and Separator classes, but the ASCII space
    if not name.isprintable() or " " in name:
        return "bad_name"
    return None


def _name(h: dict, key: str, lim: Limits) -> str:
    val = h.get(key)
    why = name_problem(val, lim.name_chars)
    if why is not None:
        raise WireError(why, f"{key} must be 1-{lim.name_chars} printable characters without spaces: {val!r:.80}")
    return str(val)


def _count(val: Any, reason: str, what: str, lim: Limits) -> int:
    if type(val) is not int:
        raise WireError("bad_header", f"{what} missing or not an int")
    if not 0 <= val <= lim.count_max:
        raise WireError(reason, f"{what} {val} not in [0, {lim.count_max}]")
    return val


def encode_act(
    run: str,
    pub: str,
    seq: int,
    drops: int,
    tap: str,
    data: np.ndarray,
    pos: np.ndarray,
    *,
    lead: Sequence[int] = (),
    unwatched: int = 0,
) -> list[Any]:
    """Parts of an activation frame. ``data`` is [rows, width] C-contiguous, ``pos`` [rows, 2] int64."""
    extra = {"unwatched": unwatched} if unwatched else {}
    hdr = _header("act", run, pub, seq, drops, tap=tap, dtype=data.dtype.name, shape=list(data.shape), lead=list(lead), **extra)
    return [hdr, data.data.cast("B"), pos.data.cast("B")]


def encode_met(
    run: str, pub: str, seq: int, drops: int, names: Sequence[str], data: np.ndarray, pos: np.ndarray, *, unwatched: int = 0
) -> list[Any]:
    """Parts of a metric frame; ``data`` is [rows, len(names)] float64."""
    extra = {"unwatched": unwatched} if unwatched else {}
    hdr = _header("met", run, pub, seq, drops, names=list(names), dtype="float64", shape=list(data.shape), **extra)
    return [hdr, data.data.cast("B"), pos.data.cast("B")]


def encode_ep(run: str, pub: str, seq: int, drops: int, episodes: Sequence[Sequence[float]], *, unwatched: int = 0) -> list[Any]:
    """Parts of an episode-end frame: rows of (step, index, return, length, terminated, truncated)."""
    extra = {"unwatched": unwatched} if unwatched else {}
    return [_header("ep", run, pub, seq, drops, episodes=[list(map(float, e)) for e in episodes], **extra)]


def encode_tok(
    run: str,
    pub: str,
    seq: int,
    drops: int,
    step: int,
    tokens: Sequence[Sequence[str]],
    *,
    context: int = 0,
    start: int = 0,
    unwatched: int = 0,
) -> list[Any]:
    """Parts of a token frame: ``tokens[b][context + t]`` is the token at row ``b * T + t`` of
    ``step``, at sequence position ``start + t``; the first ``context`` tokens of each list precede it."""
    extra: dict[str, int] = {"context": int(context), "start": int(start)} if context or start else {}
    if unwatched:
        extra["unwatched"] = unwatched
    hdr = _header("tok", run, pub, seq, drops, step=int(step), shape=[len(tokens), len(tokens[0]) if tokens else 0], **extra)
    return [hdr, msgpack.packb([list(row) for row in tokens], use_bin_type=True)]


def encode_ctl(run: str, pub: str, seq: int, drops: int, event: dict[str, Any], *, unwatched: int = 0) -> list[Any]:
    """Parts of a control-event frame; ``event`` holds only the fields :func:`decode` accepts."""
    extra = {"unwatched": unwatched} if unwatched else {}
    return [_header("ctl", run, pub, seq, drops, event=event, **extra)]


def _ctl_event(ev: Any, lim: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    if not isinstance(ev, dict):
        raise WireError("bad_header", "ctl frame: event must be a map")
    unknown = [k for k in ev if k not in _CTL_FIELDS]
    if unknown:
        raise WireError("bad_header", f"ctl frame: unknown event fields {unknown[:5]!r}"[:200])
    if ev.get("event") not in CTL_EVENTS:
        raise WireError("bad_header", f"ctl frame: event must be one of {CTL_EVENTS}")
    for key, val in ev.items():
        typ = _CTL_FIELDS[key]
        if not isinstance(val, typ) or isinstance(val, bool) and typ is not bool:
            raise WireError("bad_header", f"ctl frame: field {key!r} is not {getattr(typ, '__name__', typ)}")
        if isinstance(val, str) and len(val) > _CTL_CHARS:
            raise WireError("bad_header", f"ctl frame: field {key!r} longer than {_CTL_CHARS} chars")
        if isinstance(val, float) and not math.isfinite(val):
            raise WireError("non_finite", f"ctl frame: field {key!r} is not finite")
        num: Any = val  # (typed by the check above)
        if key in ("alpha", "value") and abs(num) > lim.value_max:
            raise WireError("out_of_range", f"ctl frame: field {key!r} past +-{lim.value_max:g}")
        if key in ("step", "unwatched"):
            _count(val, "bad_step" if key == "step" else "bad_unwatched", f"ctl frame: {key}", lim)
        if key == "version" and not -1 <= num <= lim.count_max:
            raise WireError("out_of_range", f"ctl frame: version {val} not in [-1, {lim.count_max}]")
        if key in ("id", "tap") and name_problem(val, _CTL_CHARS) is not None:
            raise WireError("bad_name", f"ctl frame: field {key!r} is not a printable name without spaces")
    active = ev.get("active", [])
    if len(active) > CONTROL_MAX_STEERS or not all(isinstance(a, str) and len(a) <= _CTL_CHARS for a in active):
        raise WireError("bad_header", f"ctl frame: active must be at most {CONTROL_MAX_STEERS} ids")
    return ev


@dataclass(frozen=True)
class Control:
    """A decoded control message: the whole set of interventions a run's agent should hold."""

    run: str
    version: int
    interventions: list[dict[str, Any]]  # each still to be validated with Intervention.from_msg


def control_topic(run: str) -> bytes:
    """The SUB subscription of ``run``; the NUL keeps run "a" from matching run "ab"."""
    return run.encode() + b"\0"


def control_endpoint(endpoint: str) -> str:
    """The control endpoint that goes with a data endpoint: tcp port + 1 (0 and * stay any port),
    ``ipc://path`` -> ``ipc://path.ctl``, ``inproc://name`` -> ``inproc://name.ctl``."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc") and rest:
        return f"{endpoint}.ctl"
    host, _, port = rest.rpartition(":")
    if scheme == "tcp" and host and port in ("0", "*"):
        return endpoint
    if scheme == "tcp" and host and port.isdigit() and int(port) < 65535:
        return f"tcp://{host}:{int(port) + 1}"
    raise ValueError(f"cannot derive a control endpoint from {endpoint!r}; pass control_endpoint=")


def encode_control(run: str, version: int, interventions: Sequence[dict[str, Any]]) -> list[bytes]:
    """Parts of a control message: ``run``'s whole desired set, ``version`` counting its changes."""
    body = {"v": VERSION, "kind": "steer", "run": run, "version": int(version), "interventions": list(interventions)}
    return [control_topic(run), msgpack.packb(body, use_bin_type=True)]


def decode_control(
    parts: Sequence[Any],
    *,
    max_bytes: int = CONTROL_MAX_BYTES,
    max_steers: int = CONTROL_MAX_STEERS,
    max_width: int = CONTROL_MAX_WIDTH,
) -> Control:
    """Parse and validate the envelope of a control message (sizes first, then exact keys and
    types); raises :class:`WireError`. Each intervention is validated by the agent afterwards."""
    if len(parts) != 2:
        raise WireError("bad_frame", f"control message with {len(parts)} parts, expected 2")
    body = memoryview(parts[1])
    if body.nbytes > max_bytes:
        raise WireError("oversized", f"control message of {body.nbytes} bytes, limit {max_bytes}")
    msg = _versioned_map(
        _unpack(
            body,
            strict_map_key=True,
            max_bin_len=0,
            max_ext_len=0,
            max_map_len=16,
            max_str_len=max_bytes,
            max_array_len=max(max_steers, max_width),
        ),
        "control message",
    )
    if set(msg) != {"v", "kind", "run", "version", "interventions"}:
        raise WireError(
            "bad_header", f"control message keys {sorted(map(str, msg))[:8]}, expected v, kind, run, version, interventions"
        )
    run, version, ivs = msg["run"], msg["version"], msg["interventions"]
    if msg["kind"] != "steer":
        raise WireError("bad_header", f"control message kind {msg['kind']!r:.40}, expected 'steer'")
    why = name_problem(run, DEFAULT_LIMITS.name_chars)
    if why is not None:
        raise WireError(why, f"control message run {run!r:.80} is not a name")
    if bytes(memoryview(parts[0])) != control_topic(run):
        raise WireError("bad_header", "run is not the message's topic")
    if type(version) is not int or version < 0:
        raise WireError("bad_header", "version must be an int >= 0")
    if not isinstance(ivs, list) or len(ivs) > max_steers or not all(isinstance(i, dict) for i in ivs):
        raise WireError("bad_header", f"interventions must be a list of at most {max_steers} maps")
    return Control(run, version, ivs)


def _unpack(buf: Any, *, what: str = "", **limits: int | bool) -> Any:
    """msgpack of untrusted bytes within ``limits``, or a ``bad_msgpack`` :class:`WireError`."""
    try:
        return msgpack.unpackb(memoryview(buf), raw=False, **limits)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise WireError("bad_msgpack", f"{what}{str(e)[:120]}") from e


def _versioned_map(obj: Any, what: str) -> dict:
    if not isinstance(obj, dict):
        raise WireError("bad_header", f"{what} is not a map")
    if obj.get("v") != VERSION:
        raise WireError("version", f"format version {obj.get('v')!r}, this side speaks {VERSION}")
    return obj


def _tokens(buf: Any, batch: int, length: int, lim: Limits) -> list[list[str]]:
    rows = _unpack(
        buf, what="tokens: ", max_str_len=lim.name_chars * 4, max_array_len=max(batch, length), max_map_len=0, max_bin_len=0
    )
    if not (
        isinstance(rows, list)
        and len(rows) == batch
        and all(
            isinstance(r, list) and len(r) == length and all(isinstance(x, str) and len(x) <= lim.name_chars for x in r)
            for r in rows
        )
    ):
        raise WireError("bad_header", f"tokens must be {batch} lists of {length} strings of at most {lim.name_chars} chars")
    return rows


def _shape2(h: dict, lim: Limits) -> tuple[int, int]:
    shape = h.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(s) is int for s in shape)):
        raise WireError("bad_header", "shape must be [rows, width]")
    rows, width = shape
    if rows < 1 or width < 1:
        raise WireError("bad_header", f"shape {shape} has an empty dimension")
    if rows > lim.rows or width > lim.width or rows * width * 8 > lim.frame_bytes:
        raise WireError("oversized", f"shape {shape} over the limits")
    return rows, width


def _array(buf: Any, dtype: str, rows: int, width: int, what: str) -> np.ndarray:
    mv = memoryview(buf)
    itemsize = np.dtype(dtype).itemsize
    if mv.nbytes != rows * width * itemsize:
        raise WireError("shape_mismatch", f"{what}: {mv.nbytes} bytes for shape [{rows}, {width}] {dtype}")
    return np.frombuffer(mv, dtype=dtype).reshape(rows, width)


def decode(parts: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> Frame:
    """Parse and validate one multipart frame. Raises :class:`WireError` on anything wrong."""
    if not parts:
        raise WireError("bad_frame", "empty message")
    total = sum(memoryview(p).nbytes for p in parts)
    if total > limits.frame_bytes:
        raise WireError("oversized", f"{total} bytes")
    raw = memoryview(parts[0])
    if raw.nbytes > limits.header_bytes:
        raise WireError("oversized", f"header of {raw.nbytes} bytes")
    h = _versioned_map(
        _unpack(
            raw,
            strict_map_key=True,
            max_str_len=limits.header_bytes,
            max_bin_len=limits.header_bytes,
            max_array_len=max(limits.names, limits.episodes),
            max_map_len=64,
        ),
        "header",
    )
    kind = h.get("kind")
    if kind not in _KINDS:
        raise WireError("bad_header", f"unknown kind {kind!r}")
    run = _name(h, "run", limits)
    pub = _name(h, "pub", limits)
    seq = _count(h.get("seq"), "bad_seq", "seq", limits)
    drops = _count(h.get("drops"), "bad_drops", "drops", limits)
    unwatched = _count(h.get("unwatched", 0), "bad_unwatched", "unwatched", limits)
    t = h.get("t")
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        raise WireError("bad_header", "field 't' missing or not a number")
    if not (math.isfinite(t) and 0 <= t <= limits.time_max):
        raise WireError("bad_time", f"t {t!r} is not a time in [0, {limits.time_max:g}] s")
    head: _HeadFields = (run, pub, seq, float(t), drops, unwatched)
    return _DECODERS[kind](h, parts, limits, head)


def _decode_ep(h: dict, parts: Sequence[Any], limits: Limits, head: _HeadFields) -> EpFrame:
    if len(parts) != 1:
        raise WireError("bad_frame", f"ep frame with {len(parts)} parts")
    eps = h.get("episodes")
    if not isinstance(eps, list) or not eps:
        raise WireError("bad_header", "episodes must be a non-empty list")
    for e in eps:
        if not (isinstance(e, list) and len(e) == 6 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in e)):
            raise WireError("bad_header", "each episode is [step, index, return, length, terminated, truncated]")
        if not all(math.isfinite(x) for x in e):
            raise WireError("non_finite", "episode record with NaN or Inf")
        step, index, ret, length, term, trunc = e
        if not (0 <= step <= limits.count_max and 0 <= index <= limits.count_max):
            raise WireError("bad_step", f"episode step {step!r} or index {index!r} not in [0, {limits.count_max}]")
        if not (abs(ret) <= limits.value_max and 0 <= length <= limits.count_max and term in (0, 1) and trunc in (0, 1)):
            raise WireError("out_of_range", "episode return past the value bound, length not a count, or flags not 0/1")
    return EpFrame(*head, episodes=eps)


def _decode_ctl(h: dict, parts: Sequence[Any], limits: Limits, head: _HeadFields) -> CtlFrame:
    if len(parts) != 1:
        raise WireError("bad_frame", f"ctl frame with {len(parts)} parts")
    return CtlFrame(*head, event=_ctl_event(h.get("event"), limits))


def _decode_tok(h: dict, parts: Sequence[Any], limits: Limits, head: _HeadFields) -> TokFrame:
    if len(parts) != 2:
        raise WireError("bad_frame", f"tok frame with {len(parts)} parts, expected 2")
    batch, length = _shape2(h, limits)
    step = _count(h.get("step"), "bad_step", "step", limits)
    context, start = h.get("context", 0), h.get("start", 0)
    if not (type(context) is int and type(start) is int and 0 <= context < length and 0 <= start <= limits.count_max):
        raise WireError("bad_header", f"tok context must be in [0, {length}) and start in [0, {limits.count_max}]")
    return TokFrame(*head, step=step, tokens=_tokens(parts[1], batch, length, limits), context=context, start=start)


def _rows(kind: str, parts: Sequence[Any], h: dict, limits: Limits, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The data and pos arrays of an act or met frame, checked against the header's shape."""
    rows, width = _shape2(h, limits)
    data = _array(parts[1], dtype, rows, width, "data")
    pos = _array(parts[2], "int64", rows, 2, "pos")
    # min/max: two passes that allocate nothing; NaN makes either comparison false
    if not (float(data.min()) >= -limits.value_max and float(data.max()) <= limits.value_max):
        if not np.isfinite(data).all():
            raise WireError("non_finite", f"{kind} frame with NaN or Inf values")
        raise WireError("out_of_range", f"{kind} frame with a value past +-{limits.value_max:g}")
    if not (pos.min() >= 0 and pos.max() <= limits.count_max):
        raise WireError("bad_step", f"{kind} frame with a step or index not in [0, {limits.count_max}]")
    return data, pos


def _decode_act(h: dict, parts: Sequence[Any], limits: Limits, head: _HeadFields) -> ActFrame:
    if len(parts) != 3:
        raise WireError("bad_frame", f"act frame with {len(parts)} parts, expected 3")
    _shape2(h, limits)
    tap = _name(h, "tap", limits)
    dtype = h.get("dtype")
    if dtype not in ACT_DTYPES:
        raise WireError("bad_dtype", f"dtype {dtype!r} not in {ACT_DTYPES}")
    lead = h.get("lead", [])
    if not (isinstance(lead, list) and len(lead) <= 8 and all(type(x) is int and 0 <= x <= limits.count_max for x in lead)):
        raise WireError("bad_header", "lead must be a short list of ints")
    data, pos = _rows("act", parts, h, limits, dtype)
    return ActFrame(*head, tap=tap, data=data, pos=pos, lead=lead)


def _decode_met(h: dict, parts: Sequence[Any], limits: Limits, head: _HeadFields) -> MetFrame:
    if len(parts) != 3:
        raise WireError("bad_frame", f"met frame with {len(parts)} parts, expected 3")
    _, width = _shape2(h, limits)
    names = h.get("names")
    if not (isinstance(names, list) and len(names) == width):
        raise WireError("bad_header", "names must be one string per column")
    for n in names:
        why = name_problem(n, limits.name_chars)
        if why is not None:
            raise WireError(why, f"metric names must be 1-{limits.name_chars} printable characters without spaces: {n!r:.80}")
    if len(set(names)) != len(names):
        raise WireError("bad_header", "duplicate metric names")
    if h.get("dtype") != "float64":
        raise WireError("bad_dtype", "metric frames are float64")
    data, pos = _rows("met", parts, h, limits, "float64")
    return MetFrame(*head, names=names, data=data, pos=pos)


_DECODERS: dict[str, Callable[[dict, Sequence[Any], Limits, _HeadFields], Frame]] = {
    "act": _decode_act,
    "met": _decode_met,
    "ep": _decode_ep,
    "tok": _decode_tok,
    "ctl": _decode_ctl,
}
