"""Steering: removable edits of a tap's value along its last dim ([B, D], [B, T, D], [E, B, D]).

    with add(policy, "fc2:in", direction, 2.5):  # h' = h + 2.5 d; off again, bit for bit, on exit
        action = policy(obs)

``:in`` edits the module's first positional input (with ``F.relu`` the post-activation state exists
only as the next module's input); ``:out`` the output, or the first tensor of a tuple/list/dict
output (an LSTM's ``out``). Steers compose in registration order. Widths are checked at every
forward: a mismatch raises :class:`SteerError` naming the tap instead of broadcasting into nonsense.
With ``on_error=callback`` (live control) a steer that fails at a forward removes itself, leaves
that activation unchanged and hands the error to the callback instead of raising into the policy.
:class:`Intervention` is a steer as a strictly validated control-channel message.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from agent_side.taps import TapError, TapSpec, first_tensor, parse_tap, resolve

if TYPE_CHECKING:  # the agent side stays importable without the monitor package
    from monitor.transcoders.model import Transcoder

__all__ = ["SteerError", "Steer", "add", "scale", "ablate", "clamp", "steer_latent", "Intervention", "from_transcoder", "OPS"]

log = logging.getLogger(__name__)

OPS = ("add", "scale", "ablate", "clamp")
MAX_TAP_CHARS = 512
_FIELDS = frozenset({"op", "tap", "direction", "alpha", "value", "w_enc", "b_enc", "source", "id"})


class SteerError(ValueError):
    """A steer that cannot be applied as asked: bad vector, bad tap, width mismatch, bad message."""


class Steer:
    """A live intervention: a handle with ``.remove()``, also a context manager (removed on exit)."""

    def __init__(self, tap: str, op: str, handles: Sequence[Any]) -> None:
        self.tap, self.op = tap, op
        self._handles = list(handles)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> Steer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Steer({self.op} at {self.tap!r}, {'active' if self.active else 'removed'})"


class _Vec:
    """A 1-D vector kept on the CPU in float64, with its cast to each (dtype, device) it met cached."""

    def __init__(self, name: str, values: Any, *, unit: bool = False) -> None:
        try:
            if isinstance(values, torch.Tensor):
                t = values.detach().to(device="cpu", dtype=torch.float64, copy=True)
            else:
                t = torch.from_numpy(np.array(values, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise SteerError(f"{name} must be a 1-D sequence of numbers: {e}") from e
        if t.dim() != 1 or t.numel() == 0:
            raise SteerError(f"{name} must be a non-empty 1-D vector, got shape {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise SteerError(f"{name} has NaN or infinite entries")
        if unit:
            norm = float(t.norm())
            if norm == 0.0:
                raise SteerError(f"{name} has zero norm: there is no direction to scale or ablate")
            t = t / norm
        self.name, self.cpu = name, t
        self._cast: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def fit(self, x: torch.Tensor, where: str) -> torch.Tensor:
        """This vector as ``x``'s dtype and device, once ``x``'s last dim is known to match."""
        if not x.is_floating_point():
            raise SteerError(f"{where}: the activation is {x.dtype}, not floating point")
        width = x.shape[-1] if x.dim() else None
        if width != self.cpu.numel():
            raise SteerError(
                f"{where}: {self.name} has {self.cpu.numel()} entries but the activation's last dim is {width} (shape {tuple(x.shape)})"
            )
        key = (x.dtype, x.device)
        if key not in self._cast:
            self._cast[key] = self.cpu.to(device=x.device, dtype=x.dtype)
        return self._cast[key]


def _finite(name: str, v: Any) -> float:
    if isinstance(v, bool):
        raise SteerError(f"{name} must be a number, got a bool")
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError) as e:
        raise SteerError(f"{name} must be a finite number, got {v!r:.40}") from e
    if not math.isfinite(f):
        raise SteerError(f"{name} must be finite, got {f}")
    return f


def _spec(name: str, tap: Any) -> TapSpec:
    if not isinstance(tap, str) or len(tap) > MAX_TAP_CHARS:
        got = f"{len(tap)} chars" if isinstance(tap, str) else type(tap).__name__
        raise SteerError(f"{name} must be a string of at most {MAX_TAP_CHARS} chars, got {got}")
    try:
        return parse_tap(tap)
    except TapError as e:
        raise SteerError(f"{name}: {e}") from e


def _swap_first(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor | None], tap: str) -> Any:
    """``obj`` with its first tensor (in :func:`first_tensor`'s order) replaced by ``fn`` of it;
    None, meaning "leave the output alone", when ``fn`` returns None."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (tuple, list)) else ()
    for key, item in items:
        if first_tensor(item) is None:
            continue
        new = _swap_first(item, fn, tap)
        if new is None:
            return None
        if isinstance(obj, dict):
            out = copy.copy(obj)  # a fresh container: the module's own return value stays untouched
            out[key] = new
            return out
        parts = [*obj[:key], new, *obj[key + 1 :]]
        if isinstance(obj, list):
            return parts
        return type(obj)(*parts) if hasattr(obj, "_fields") else type(obj)(parts)
    raise SteerError(f"{tap}: the module's output ({type(obj).__name__}) holds no tensor to steer")


_Guard = Callable[[Exception], None]


def _hook(module: nn.Module, site: str, tap: str, fn: Callable[[torch.Tensor], torch.Tensor | None], guard: _Guard | None) -> Any:
    """A forward (pre-)hook handing the tap's tensor to ``fn`` and passing on what it returns;
    with a ``guard``, an error goes to it and the value passes unchanged."""
    if site == "in":

        def pre(_m: nn.Module, args: tuple) -> tuple | None:
            try:
                if not args or not isinstance(args[0], torch.Tensor):
                    raise SteerError(f"{tap}: the module was not called with a tensor as its first positional argument")
                new = fn(args[0])
            except Exception as e:
                if guard is None:
                    raise
                guard(e)
                return None
            return None if new is None else (new, *args[1:])

        return module.register_forward_pre_hook(pre)

    def post(_m: nn.Module, _args: tuple, out: Any) -> Any:
        try:
            return _swap_first(out, fn, tap)
        except Exception as e:
            if guard is None:
                raise
            guard(e)
            return None

    return module.register_forward_hook(post)


def _install(
    root: nn.Module,
    tap: str,
    op: str,
    edit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    source: str | None = None,
    on_error: Callable[[SteerError], None] | None = None,
) -> Steer:
    """Register ``edit(value at the tap, value at the source)`` as the tap's new value."""
    spec = _spec("tap", tap)
    try:
        module = resolve(root, spec)
        src = spec if source is None else _spec("source", source)
        src_module = resolve(root, src)
    except TapError as e:
        raise SteerError(str(e)) from e
    handles = []
    guard = None
    if on_error is not None:

        def guard(e: Exception) -> None:
            steer.remove()  # torch snapshots hooks per call: this forward's later modules no longer see it
            on_error(e if isinstance(e, SteerError) else SteerError(f"{op} at {tap!r}: {type(e).__name__}: {e}"))

    if src == spec:

        def at_tap(x: torch.Tensor) -> torch.Tensor:
            return edit(x, x)
    else:
        # The source's value is handed over within one forward; popping it makes a tap that fires
        # without a fresh source value (source after the tap, or skipped) an error, not a stale read.
        seen: dict[str, torch.Tensor] = {}

        def remember(s: torch.Tensor) -> None:
            seen["s"] = s

        def at_tap(x: torch.Tensor) -> torch.Tensor:
            if "s" not in seen:
                raise SteerError(f"{op} at {tap!r}: source {source!r} did not run before the tap in this forward")
            return edit(x, seen.pop("s"))

        handles.append(_hook(src_module, src.site, str(source), remember, guard))
    handles.append(_hook(module, spec.site, tap, at_tap, guard))
    log.debug("steer %s at %s registered", op, tap)
    steer = Steer(tap, op, handles)
    return steer


_OnError = Callable[[SteerError], None] | None


def add(root: nn.Module, tap: str, direction: Any, alpha: float, *, on_error: _OnError = None) -> Steer:
    """``x' = x + alpha * direction``."""
    d, a, where = _Vec("direction", direction), _finite("alpha", alpha), f"add at {tap!r}"
    return _install(root, tap, "add", lambda x, _s: x + a * d.fit(x, where), on_error=on_error)


def _project(root: nn.Module, tap: str, direction: Any, factor: float, op: str, on_error: _OnError) -> Steer:
    u, k, where = _Vec("direction", direction, unit=True), _finite("factor", factor) - 1.0, f"{op} at {tap!r}"

    def edit(x: torch.Tensor, _s: torch.Tensor) -> torch.Tensor:
        uu = u.fit(x, where)
        return x + k * (x @ uu).unsqueeze(-1) * uu

    return _install(root, tap, op, edit, on_error=on_error)


def scale(root: nn.Module, tap: str, direction: Any, factor: float, *, on_error: _OnError = None) -> Steer:
    """Multiply the component along ``u = d/|d|`` by ``factor``: ``x' = x + (factor - 1)(x·u)u``."""
    return _project(root, tap, direction, factor, "scale", on_error)


def ablate(root: nn.Module, tap: str, direction: Any, *, on_error: _OnError = None) -> Steer:
    """Project the direction out: ``x' = x - (x·u)u``, the same as ``scale(..., 0)``."""
    return _project(root, tap, direction, 0.0, "ablate", on_error)


def clamp(
    root: nn.Module,
    tap: str,
    *,
    w_enc: Any,
    b_enc: float,
    w_dec: Any,
    value: float,
    source: str | None = None,
    on_error: _OnError = None,
) -> Steer:
    """Hold one latent at ``value``: ``z = relu(s·w_enc + b_enc)`` with ``s`` the value at ``source``
    (default: the tap) in the same forward, then ``x' = x + (value - z) w_dec``. A source that runs
    several times before the tap (a recurrent cell) hands over its last value."""
    enc, dec = _Vec("w_enc", w_enc), _Vec("w_dec", w_dec)
    b, v = _finite("b_enc", b_enc), _finite("value", value)
    where = f"clamp at {tap!r}"
    where_src = where if source is None else f"{where} (source {source!r})"

    def edit(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        z = torch.relu(s @ enc.fit(s, where_src) + b)
        if z.shape != x.shape[:-1]:
            raise SteerError(f"{where_src}: source rows {tuple(s.shape[:-1])} do not line up with tap rows {tuple(x.shape[:-1])}")
        return x + (v - z.to(x.dtype)).unsqueeze(-1) * dec.fit(x, where)

    return _install(root, tap, "clamp", edit, source=source, on_error=on_error)


def steer_latent(
    root: nn.Module,
    tap: str,
    model: Transcoder,
    latent: int,
    *,
    op: str,
    alpha: float = 0.0,
    value: float = 0.0,
    source: str | None = None,
) -> Steer:
    """Steer along a transcoder latent: add/scale/ablate its decoder row, or clamp it (see :func:`from_transcoder`)."""
    return from_transcoder(model, latent, tap=tap, op=op, alpha=alpha, value=value, source=source).apply(root)


def _numbers(name: str, v: Any) -> tuple[float, ...]:
    if not isinstance(v, (list, tuple)):
        raise SteerError(f"{name} must be a list of numbers, got {type(v).__name__}")
    if not v:
        raise SteerError(f"{name} is empty")
    return tuple(_plain(f"{name}[{i}]", x) for i, x in enumerate(v))


def _plain(name: str, v: Any) -> float:
    """A finite int or float as sent over the wire: no bools, strings or None coerced."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SteerError(f"{name} must be a number, got {type(v).__name__}")
    return _finite(name, v)


@dataclass(frozen=True)
class Intervention:
    """A steer as data, for the control channel; construction validates every field."""

    op: str
    tap: str
    direction: tuple[float, ...]  # add/scale/ablate: the direction; clamp: w_dec
    alpha: float = 0.0  # add: alpha; scale: factor
    value: float = 0.0  # clamp: the target
    w_enc: tuple[float, ...] | None = None  # clamp only
    b_enc: float = 0.0  # clamp only
    source: str | None = None  # clamp only
    id: str = ""  # caller-chosen label, e.g. "fc2:out/3"

    def __post_init__(self) -> None:
        if not isinstance(self.op, str) or self.op not in OPS:
            raise SteerError(f"op must be one of {OPS}, got {self.op!r:.40}")
        _spec("tap", self.tap)
        if not isinstance(self.id, str) or len(self.id) > MAX_TAP_CHARS:
            raise SteerError(f"id must be a string of at most {MAX_TAP_CHARS} chars")
        for name in ("alpha", "value", "b_enc"):
            object.__setattr__(self, name, _plain(name, getattr(self, name)))
        object.__setattr__(self, "direction", _numbers("direction", self.direction))
        if self.op == "clamp":
            if self.w_enc is None:
                raise SteerError("clamp needs w_enc (the latent's encoder column)")
            object.__setattr__(self, "w_enc", _numbers("w_enc", self.w_enc))
            if self.source is not None:
                _spec("source", self.source)
        elif self.w_enc is not None or self.source is not None or self.b_enc != 0.0:
            raise SteerError(f"w_enc, b_enc and source apply to clamp only, not to {self.op!r}")

    def to_msg(self) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "op": self.op,
            "tap": self.tap,
            "direction": list(self.direction),
            "alpha": self.alpha,
            "value": self.value,
            "id": self.id,
        }
        if self.op == "clamp":
            msg.update(w_enc=list(self.w_enc or ()), b_enc=self.b_enc)
            if self.source is not None:
                msg["source"] = self.source
        return msg

    @classmethod
    def from_msg(cls, msg: object, *, max_width: int = 1 << 16) -> Intervention:
        """Validate a decoded message from an untrusted sender; :class:`SteerError` says what is wrong."""
        if not isinstance(msg, dict):
            raise SteerError(f"an intervention must be a dict, got {type(msg).__name__}")
        unknown = sorted(repr(k) for k in msg if k not in _FIELDS)
        if unknown:
            raise SteerError(f"unknown keys {', '.join(unknown)[:200]}; allowed: {', '.join(sorted(_FIELDS))}")
        missing = [k for k in ("op", "tap", "direction") if k not in msg]
        if missing:
            raise SteerError(f"missing keys: {', '.join(missing)}")
        for key in ("direction", "w_enc"):  # before anything walks the lists
            v = msg.get(key)
            if isinstance(v, (list, tuple)) and len(v) > max_width:
                raise SteerError(f"{key} has {len(v)} entries, more than max_width={max_width}")
        return cls(**msg)

    def apply(self, root: nn.Module, *, on_error: _OnError = None) -> Steer:
        """Register this steer on ``root``; ``on_error``: see the module docstring."""
        if self.op in ("add", "scale"):
            return (add if self.op == "add" else scale)(root, self.tap, self.direction, self.alpha, on_error=on_error)
        if self.op == "ablate":
            return ablate(root, self.tap, self.direction, on_error=on_error)
        return clamp(
            root,
            self.tap,
            w_enc=self.w_enc,
            b_enc=self.b_enc,
            w_dec=self.direction,
            value=self.value,
            source=self.source,
            on_error=on_error,
        )


def from_transcoder(
    model: Transcoder, latent: int, *, tap: str, op: str, alpha: float = 0.0, value: float = 0.0, source: str | None = None
) -> Intervention:
    """The intervention on latent ``latent``: its decoder row ``W_dec[latent]`` as the direction;
    clamp also takes ``W_enc[:, latent]`` and ``b_enc[latent]`` (``source`` is the transcoder's source tap)."""
    d_sae = int(model.W_dec.shape[0])
    j = -1 if isinstance(latent, bool) or not hasattr(latent, "__index__") else operator.index(latent)
    if not 0 <= j < d_sae:
        raise SteerError(f"latent must be an int in [0, {d_sae}), got {latent!r}")
    direction = tuple(model.W_dec[j].detach().cpu().double().tolist())
    alpha, value = _finite("alpha", alpha), _finite("value", value)  # numpy or 0-d tensor scalars are fine here
    if op != "clamp":
        return Intervention(op, tap, direction, alpha=alpha, source=source, id=f"{tap}/{j}")
    if not getattr(model, "plain", True):
        raise SteerError(
            f"clamp evaluates relu(x W_enc + b_enc) on the agent, so it needs a plain ReLU transcoder; this one is "
            f"{model.arch}{' with ' + model.input_norm if model.input_norm != 'none' else ''}: use add or ablate"
        )
    w_enc = tuple(model.W_enc[:, j].detach().cpu().double().tolist())
    return Intervention(
        op, tap, direction, value=value, w_enc=w_enc, b_enc=float(model.b_enc[j].detach()), source=source, id=f"{tap}/{j}"
    )
