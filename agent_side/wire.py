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

``pos[:, 0]`` is the step of each row and ``pos[:, 1]`` its index inside that step's forward
(the env index of a vectorized env, or ``b * tokens + t`` for a language model), so activations
and metrics of the same step line up row by row.

Every limit is checked before anything is allocated; :func:`decode` either returns a
:class:`Frame` or raises :class:`WireError` with a short ``reason`` that the monitor counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

__all__ = [
    "VERSION",
    "Frame",
    "WireError",
    "Limits",
    "encode_act",
    "encode_met",
    "encode_ep",
    "decode",
    "ACT_DTYPES",
]

VERSION = 1
ACT_DTYPES = ("float16", "float32", "float64")
_KINDS = ("act", "met", "ep")


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


DEFAULT_LIMITS = Limits()


class WireError(ValueError):
    """A frame that cannot be accepted; ``reason`` is a short counter name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Frame:
    kind: str
    run: str
    pub: str
    seq: int
    t: float
    drops: int
    tap: str = ""
    data: np.ndarray | None = None  # [rows, width]
    pos: np.ndarray | None = None  # [rows, 2] int64
    names: list[str] = field(default_factory=list)
    lead: list[int] = field(default_factory=list)
    episodes: list[list[float]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        if self.data is not None:
            return int(self.data.shape[0])
        return len(self.episodes)


def _header(kind: str, run: str, pub: str, seq: int, drops: int, **extra: Any) -> bytes:
    h = {"v": VERSION, "kind": kind, "run": run, "pub": pub, "seq": seq, "t": time.time(), "drops": drops}
    h.update(extra)
    return msgpack.packb(h, use_bin_type=True)


def encode_act(
    run: str, pub: str, seq: int, drops: int, tap: str, data: np.ndarray, pos: np.ndarray, *, lead: Sequence[int] = ()
) -> list[Any]:
    """Parts of an activation frame. ``data`` is [rows, width] C-contiguous, ``pos`` [rows, 2] int64."""
    hdr = _header(
        "act", run, pub, seq, drops, tap=tap, dtype=data.dtype.name, shape=list(data.shape), lead=list(lead)
    )
    return [hdr, memoryview(data).cast("B"), memoryview(pos).cast("B")]


def encode_met(run: str, pub: str, seq: int, drops: int, names: Sequence[str], data: np.ndarray, pos: np.ndarray) -> list[Any]:
    """Parts of a metric frame; ``data`` is [rows, len(names)] float64."""
    hdr = _header("met", run, pub, seq, drops, names=list(names), dtype="float64", shape=list(data.shape))
    return [hdr, memoryview(data).cast("B"), memoryview(pos).cast("B")]


def encode_ep(run: str, pub: str, seq: int, drops: int, episodes: Sequence[Sequence[float]]) -> list[Any]:
    """Parts of an episode-end frame: rows of (step, index, return, length, terminated, truncated)."""
    return [_header("ep", run, pub, seq, drops, episodes=[list(map(float, e)) for e in episodes])]


def _need(h: dict, key: str, typ: type | tuple[type, ...]) -> Any:
    val = h.get(key)
    if not isinstance(val, typ) or isinstance(val, bool) and typ is not bool:
        raise WireError("bad_header", f"field {key!r} missing or not {getattr(typ, '__name__', typ)}")
    return val


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
    try:
        h = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_str_len=limits.header_bytes,
            max_bin_len=limits.header_bytes,
            max_array_len=max(limits.names, limits.episodes),
            max_map_len=64,
        )
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise WireError("bad_msgpack", str(e)[:120]) from e
    if not isinstance(h, dict):
        raise WireError("bad_header", "header is not a map")
    if h.get("v") != VERSION:
        raise WireError("version", f"format version {h.get('v')!r}, this side speaks {VERSION}")
    kind = h.get("kind")
    if kind not in _KINDS:
        raise WireError("bad_header", f"unknown kind {kind!r}")
    run = _need(h, "run", str)
    pub = _need(h, "pub", str)
    if not run or len(run) > limits.name_chars or len(pub) > limits.name_chars:
        raise WireError("bad_header", "run or pub empty or too long")
    seq = _need(h, "seq", int)
    drops = _need(h, "drops", int)
    t = h.get("t")
    if not isinstance(t, (int, float)) or not math.isfinite(t):
        raise WireError("bad_header", "field 't' missing or not a number")
    frame = Frame(kind=kind, run=run, pub=pub, seq=seq, t=float(t), drops=drops)

    if kind == "ep":
        if len(parts) != 1:
            raise WireError("bad_frame", f"ep frame with {len(parts)} parts")
        eps = h.get("episodes")
        if not isinstance(eps, list) or not eps:
            raise WireError("bad_header", "episodes must be a non-empty list")
        for e in eps:
            if not (isinstance(e, list) and len(e) == 6 and all(isinstance(x, (int, float)) for x in e)):
                raise WireError("bad_header", "each episode is [step, index, return, length, terminated, truncated]")
            if not all(math.isfinite(x) for x in e):
                raise WireError("non_finite", "episode record with NaN or Inf")
        frame.episodes = eps
        return frame

    if len(parts) != 3:
        raise WireError("bad_frame", f"{kind} frame with {len(parts)} parts, expected 3")
    rows, width = _shape2(h, limits)
    if kind == "act":
        frame.tap = _need(h, "tap", str)
        if not frame.tap or len(frame.tap) > limits.name_chars:
            raise WireError("bad_header", "tap empty or too long")
        dtype = h.get("dtype")
        if dtype not in ACT_DTYPES:
            raise WireError("bad_dtype", f"dtype {dtype!r} not in {ACT_DTYPES}")
        lead = h.get("lead", [])
        if not (isinstance(lead, list) and len(lead) <= 8 and all(type(x) is int and x >= 0 for x in lead)):
            raise WireError("bad_header", "lead must be a short list of ints")
        frame.lead = lead
    else:
        names = h.get("names")
        if not (isinstance(names, list) and len(names) == width and all(isinstance(n, str) and 0 < len(n) <= limits.name_chars for n in names)):
            raise WireError("bad_header", "names must be one non-empty string per column")
        if len(set(names)) != len(names):
            raise WireError("bad_header", "duplicate metric names")
        if h.get("dtype") != "float64":
            raise WireError("bad_dtype", "metric frames are float64")
        frame.names = names
        dtype = "float64"
    frame.data = _array(parts[1], dtype, rows, width, "data")
    frame.pos = _array(parts[2], "int64", rows, 2, "pos")
    if not np.isfinite(frame.data).all():
        raise WireError("non_finite", f"{kind} frame with NaN or Inf values")
    return frame
