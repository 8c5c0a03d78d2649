"""Taps: a module name plus a site, ``in`` or ``out`` (``mlp_extractor.policy_net.0:in``), and
what a tap holds while it waits to be sent (:class:`TapBuffer`).

A language model's tap may also be a TransformerLens hook name (``blocks.3.hook_resid_post``, an
SAELens SAE's ``hook_name``): on a ``HookedTransformer`` it is the hook point module itself, on a
HuggingFace model of a family :mod:`agent_side.hooknames` maps it is the module and site carrying
the same value. Either way :func:`resolve_tap` names the tap by the hook name alone (a hook point's
input is its output, so ``:in`` and ``:out`` name the same tap), and its rows are one per token.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agent_side import hooknames

__all__ = [
    "TapSpec",
    "TapError",
    "TapBuffer",
    "parse_tap",
    "resolve",
    "resolve_tap",
    "first_tensor",
    "as_rows",
    "tensor_hook",
    "wrap_forward",
    "wrap_first_input",
    "sequential_parent",
    "FLUSH_BYTES",
]

SITES = ("in", "out")
SENDABLE = (torch.float16, torch.float32, torch.float64)  # sent as they are; other dtypes as float32
FLUSH_BYTES = 4 * 1024 * 1024  # a frame holds about this much at most (big language-model forwards)


class TapError(ValueError):
    """A tap that does not name a module of the model, or a malformed tap string."""


@dataclass(frozen=True)
class TapSpec:
    """``module`` and ``site`` say where the hook goes; ``name``, when set, is what the tap streams
    as (a TransformerLens hook name); ``per_position`` says the tensor is [batch, position, ...]
    with one row per position (a hook point's per-head [batch, pos, head, d_head] values)."""

    module: str
    site: str
    name: str | None = None
    per_position: bool = False

    def __str__(self) -> str:
        return self.name or f"{self.module}:{self.site}"


def parse_tap(spec: str) -> TapSpec:
    """``"fc1:out"`` -> ``TapSpec("fc1", "out")``; a bare module name means its output."""
    if not isinstance(spec, str) or not spec.strip():
        raise TapError(f"tap must be a non-empty string like 'fc1:out', got {spec!r}")
    name, sep, site = spec.strip().rpartition(":")
    if not sep:
        name, site = spec.strip(), "out"
    if site not in SITES:
        raise TapError(f"tap {spec!r}: site must be one of {SITES}, got {site!r}")
    return TapSpec(name, site)


def _missing(root: torch.nn.Module, name: str, modules: dict[str, torch.nn.Module]) -> TapError:
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    if not close:
        close = [n for n in names if name.split(".")[-1] in n][:5] or names[:5]
    return TapError(f"no module named {name!r} in {type(root).__name__}; close matches: {', '.join(close) or '(none)'}")


def _has_hook_points(modules: dict[str, torch.nn.Module]) -> bool:
    """Whether the model is a TransformerLens one (its hook points are its modules)."""
    return any(type(m).__name__ == "HookPoint" for m in modules.values())


def resolve(root: torch.nn.Module, spec: TapSpec) -> torch.nn.Module:
    """The submodule ``spec.module`` names, or a :class:`TapError` listing close matches.

    A TransformerLens hook name that is not a module of ``root`` is refused here with the module
    and site that carry it (only :func:`resolve_tap` may move a tap to another site)."""
    modules = dict(root.named_modules())
    if spec.module in modules:
        return modules[spec.module]
    if hooknames.is_hook_name(spec.module) and not _has_hook_points(modules):
        try:
            module, site = hooknames.translate(root, spec.module)
        except hooknames.HookNameError as e:
            raise TapError(str(e)) from None
        raise TapError(f"{spec.module!r} is a TransformerLens hook name; on {type(root).__name__} name it {module}:{site} here")
    raise _missing(root, spec.module, modules)


_NOT_PER_TOKEN = ("hook_attn_scores", "hook_pattern")  # [batch, head, query, key]: no row per token


def resolve_tap(root: torch.nn.Module, spec: TapSpec) -> tuple[TapSpec, torch.nn.Module]:
    """The tap as it will be hooked and named, and its module.

    A module of ``root`` is that module (a TransformerLens ``HookPoint`` is named by its hook name,
    one row per position); a TransformerLens hook name on a HuggingFace model of a family
    :data:`agent_side.hooknames.FAMILIES` maps is moved to the module and site carrying it and keeps
    the hook name. Anything else is a :class:`TapError` that says why and what would work."""
    modules = dict(root.named_modules())
    mod = modules.get(spec.module)
    if mod is not None:
        if type(mod).__name__ != "HookPoint":
            return spec, mod
        if spec.module.rsplit(".", 1)[-1] in _NOT_PER_TOKEN:
            raise TapError(
                f"hook {spec.module!r} holds [batch, head, query, key] attention values, no row per token; "
                "tap blocks.L.attn.hook_z or blocks.L.hook_attn_out instead"
            )
        return TapSpec(spec.module, "out", name=spec.module, per_position=True), mod
    if not hooknames.is_hook_name(spec.module) or _has_hook_points(modules):  # a misspelt hook of a HookedTransformer
        raise _missing(root, spec.module, modules)
    try:
        module, site = hooknames.translate(root, spec.module)
    except hooknames.HookNameError as e:
        raise TapError(str(e)) from None
    if module not in modules:  # a family's module this build of the model lacks
        raise _missing(root, module, modules)
    return TapSpec(module, site, name=spec.module), modules[module]


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor in a module's input or output (LSTMs return ``(out, (h, c))``)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for item in obj:
            t = first_tensor(item)
            if t is not None:
                return t
    elif isinstance(obj, dict):  # includes transformers' ModelOutput
        for item in obj.values():
            t = first_tensor(item)
            if t is not None:
                return t
    return None


def as_rows(t: torch.Tensor, *, per_position: bool = False) -> tuple[torch.Tensor, list[int]]:
    """Flatten a tensor into [rows, width] and return the leading shape of one forward.

    [B, D] -> B rows; [B, T, D] (sequences, tokens) -> B*T rows of D; [D] -> 1 row;
    4-D and up (conv maps) -> B rows of everything else flattened, or, ``per_position``,
    B*T rows of everything after the position ([B, T, heads, d_head] -> rows of heads*d_head).
    """
    if per_position and t.dim() > 3:
        return t.reshape(t.shape[0] * t.shape[1], -1), list(t.shape[:2])
    if t.dim() == 0:
        return t.reshape(1, 1), [1]
    if t.dim() == 1:
        return t.reshape(1, -1), [1]
    if t.dim() <= 3:
        lead = list(t.shape[:-1])
        return t.reshape(-1, t.shape[-1]), lead
    return t.reshape(t.shape[0], -1), [t.shape[0]]


def tensor_hook(module: torch.nn.Module, site: str, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Any:
    """A removable hook calling ``fn`` on the module's first input (site 'in') or the first tensor
    of its output ('out'); a tensor ``fn`` returns replaces it, None leaves it as it was."""
    if site == "in":

        def pre(m: torch.nn.Module, args: tuple) -> tuple | None:
            new = fn(first_tensor(args))
            return None if new is None else (new, *args[1:])

        return module.register_forward_pre_hook(pre)

    def post(m: torch.nn.Module, args: tuple, out: Any) -> Any:
        new = fn(first_tensor(out))
        if new is None:
            return None
        return new if isinstance(out, torch.Tensor) else (new, *out[1:])

    return module.register_forward_hook(post)


Emit = Callable[[np.ndarray, np.ndarray, list[int]], None]


class TapBuffer:
    """One tap's pending rows: a private copy of each forward's value and its step, joined into
    one frame's rows and (step, index) positions only when the buffer is sent (:meth:`flush`,
    which hands them to ``emit`` with the leading shape of one forward).

    The copy (an in-place op on the value afterwards cannot touch what was captured) is one
    ``t.numpy().copy()``: inside a running agent, with its caches cold, that costs about 1 µs
    where a ``copy_`` into a preallocated tensor costs about 1.7 µs (torch's dispatch), and
    ``np.copyto`` into a preallocated array more than both. A forward of the same shape and dtype
    as the one before, on the CPU and needing no grad, takes that short path, checked on the
    numpy view (cheaper to read than the tensor); anything else (a new width, rank, dtype, batch
    size, a value that needs grad or lives on another device) goes the general way, which starts a
    new frame when the kind of forward changes, and sends a forward too big for a frame on its own.
    """

    __slots__ = ("name", "per_position", "flush_rows", "flush_s", "emit", "arrays", "steps", "counts", "rows")
    __slots__ += ("shape", "dtype", "view_shape", "view_dtype", "r", "room", "width", "lead", "cap", "calls", "due")

    def __init__(self, name: str, *, per_position: bool, flush_rows: int, flush_s: float, emit: Emit) -> None:
        self.name = name
        self.per_position = per_position
        self.flush_rows = max(1, int(flush_rows))
        self.flush_s = flush_s
        self.emit = emit
        self.arrays: list[np.ndarray] = []  # per pending forward: its value (short path) or its rows
        self.steps: list[int] = []
        self.counts: list[int] | None = None  # rows per pending forward; None while each has ``r``
        self.rows = 0
        self.shape: torch.Size | None = None  # the shape of this frame's forwards (None: they differ)
        self.dtype: torch.dtype | None = None
        self.view_shape: tuple[int, ...] = ()  # what t.numpy() of such a forward looks like
        self.view_dtype: np.dtype | None = None
        self.r = 0  # rows of one forward of that shape
        self.room = -1  # the short path takes a forward while rows <= room (-1: not this frame)
        self.width = -1
        self.lead: list[int] = []
        self.cap = 0  # rows a frame holds
        self.calls = 0  # forwards seen: the step of a tap used without env steps
        self.due = math.inf  # when the oldest pending row must go out

    def put(self, t: torch.Tensor, step: int) -> bool:
        """Copy one forward's value in; True when the buffer is full (``due`` says when it is old)."""
        self.calls += 1
        if self.rows <= self.room:
            try:
                view = t.numpy()  # refuses a value on another device or one that needs grad
            except Exception:
                return self._put(t, step)
            # numpy's shape and dtype cost less to read than torch's
            if view.shape == self.view_shape and view.dtype is self.view_dtype:
                if not self.steps:
                    self.due = time.monotonic() + self.flush_s
                self.arrays.append(view.copy())
                self.steps.append(step)
                self.rows += self.r
                return self.rows > self.room
        return self._put(t, step)

    def _put(self, t: torch.Tensor, step: int) -> bool:
        # the short path takes the next forwards like this one if t.numpy() would serve
        short = t.dim() > 0 and t.is_cpu and not t.requires_grad and t.dtype in SENDABLE and t.layout is torch.strided
        if t.requires_grad:
            t = t.detach()
        flat, lead = (t, []) if t.dim() == 2 else as_rows(t, per_position=self.per_position)
        n, width = flat.shape
        if n == 0 or width == 0:
            return False
        dtype = t.dtype if t.dtype in SENDABLE else torch.float32
        if self.steps and (width != self.width or dtype is not self.dtype or lead != self.lead or self.rows + n > self.cap):
            self.flush()  # a frame holds one kind of forward, and at most cap rows
        if width != self.width or dtype is not self.dtype:
            itemsize = torch.empty((), dtype=dtype).element_size()
            self.cap = max(1, min(self.flush_rows, FLUSH_BYTES // (width * itemsize)))
            self.width, self.dtype = width, dtype
        self.lead = lead
        rows = flat.to(device="cpu", dtype=dtype).numpy().copy()
        if n > self.cap:  # one forward bigger than a frame: sent on its own, now
            pos = np.zeros((n, 2), dtype=np.int64)
            pos[:, 0] = step
            pos[:, 1] = np.arange(n)
            self.emit(rows, pos, list(lead))
            return False
        if not self.steps:
            self.due = time.monotonic() + self.flush_s
            self.shape, self.r, self.room = (t.shape if t.dim() else None), n, self.cap - n if short else -1
            self.view_shape, self.view_dtype = tuple(t.shape), rows.dtype
        elif self.shape is not None and t.shape != self.shape:  # another batch size: no short path until sent
            self.counts, self.shape, self.room = [self.r] * len(self.steps), None, -1
        self.arrays.append(rows if self.shape is None else rows.reshape(t.shape))  # as the short path keeps them
        self.steps.append(step)
        if self.counts is not None:
            self.counts.append(n)
        self.rows += n
        return self.rows > self.cap - n

    def flush(self) -> None:
        """Hand the pending rows to ``emit`` and empty the buffer."""
        if not self.steps:
            return
        n, width, arrays = self.rows, self.width, self.arrays
        if self.counts is None:  # one shape: the values join as they are
            data = (arrays[0] if len(arrays) == 1 else np.concatenate(arrays)).reshape(n, width)
        else:
            data = np.concatenate([a.reshape(-1, width) for a in arrays])
        steps = np.array(self.steps, dtype=np.int64)
        pos = np.zeros((n, 2), dtype=np.int64)
        if self.counts is None and self.r == 1:  # one row per forward: the common RL case
            pos[:, 0] = steps
        else:
            counts = np.full(len(steps), self.r, dtype=np.int64) if self.counts is None else np.array(self.counts)
            pos[:, 0] = np.repeat(steps, counts)
            pos[:, 1] = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
        self.arrays, self.steps, self.counts, self.rows, self.due = [], [], None, 0, math.inf
        self.emit(data, pos, list(self.lead))


def _plain_forward(module: torch.nn.Module, prev: Any) -> Any:
    """What a copied or unpickled module gets for a wrapped forward: the forward it had before."""
    return prev if prev is not None else types.MethodType(type(module).forward, module)


class _Forward:
    """A module's forward that hands its output to ``fn``: what an ``:out`` tap puts on a module.

    Torch runs a module with any forward hook down its general call path, about a microsecond a
    module more than the hook-free one; an instance ``forward`` keeps the fast path. It runs
    before the module's forward hooks (a steer at ``:out`` edits what it returns after the tap
    has it). A copy or a pickle of the module gets the plain forward back, never this one.
    """

    __slots__ = ("inner", "prev", "fn", "owner")

    def __init__(self, module: torch.nn.Module, fn: Callable[[Any], None]) -> None:
        self.prev = module.__dict__.get("forward")  # someone's instance forward (accelerate's), kept underneath
        self.inner = module.forward
        self.fn: Callable[[Any], None] | None = fn
        self.owner = id(module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        fn = self.fn
        if fn is not None:
            fn(out)
        return out

    @property
    def __signature__(self) -> inspect.Signature:  # what inspect.signature(module.forward) finds (generate(), tokens)
        return inspect.signature(self.inner)

    def __getattr__(self, name: str) -> Any:  # __func__, __self__, __name__ of the forward it wraps
        if name in _Forward.__slots__:  # not set yet (a bare copy): never recurse
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        if self.prev is not None:
            return copy.deepcopy(self.prev, memo)
        new = memo.get(self.owner)  # deepcopy holds the new module there before copying its attributes
        return self if new is None else types.MethodType(type(new).forward, new)

    def __reduce__(self) -> tuple[Any, ...]:
        return _plain_forward, (self.inner.__self__ if self.prev is None else None, self.prev)


class _ForwardHandle:
    """Takes a :class:`_Forward` off again, leaving the module as it was."""

    def __init__(self, module: torch.nn.Module, wrapper: _Forward) -> None:
        self.module, self.wrapper = module, wrapper

    def remove(self) -> None:
        d = self.module.__dict__
        if d.get("forward") is self.wrapper:
            if self.wrapper.prev is None:
                del d["forward"]
            else:
                d["forward"] = self.wrapper.prev
        # else someone wrapped the forward over ours since: ours stays in their chain, passing through
        self.wrapper.fn = None


class _Relay:
    """Whether the parent's wrapper already took the input its first child is about to get."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = False


class _ParentInput(_Forward):
    """An ``nn.Sequential``'s forward that hands its input (its first child's) to ``fn`` first."""

    __slots__ = ("relay",)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = self.fn
        if fn is not None and args:
            fn(args[0])
            self.relay.pending = True
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.relay.pending = False


class _ChildInput(_Forward):
    """The first child's forward: hands its input to ``fn`` when the parent did not (a direct call)."""

    __slots__ = ("relay",)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        relay, fn = self.relay, self.fn
        if relay.pending:
            relay.pending = False
        elif fn is not None:
            fn(args[0] if args else first_tensor(kwargs))
        return self.inner(*args, **kwargs)


class _Handles:
    def __init__(self, *handles: Any) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in reversed(self.handles):
            h.remove()


def sequential_parent(root: torch.nn.Module, spec: TapSpec, module: torch.nn.Module) -> torch.nn.Module | None:
    """The ``nn.Sequential`` (running Sequential's own forward) whose first child, called once a
    forward, is the ``:in`` tap's module: its input is that child's, so a wrapper on it can take
    the place of a pre-hook on the child. None for any other tap."""
    if spec.site != "in":
        return None
    parent_name = spec.module.rpartition(".")[0]
    try:
        parent = root.get_submodule(parent_name)
    except AttributeError:
        return None
    if not isinstance(parent, torch.nn.Sequential) or type(parent).forward is not torch.nn.Sequential.forward:
        return None
    children = list(parent)
    if not children or children[0] is not module or sum(c is module for c in children) != 1:
        return None
    return parent


def wrap_first_input(parent: torch.nn.Module, child: torch.nn.Module, fn: Callable[[Any], None]) -> Any:
    """Call ``fn(input)`` for each forward of ``child``, the first module of the Sequential ``parent``
    (:func:`sequential_parent`), without a pre-hook: ``parent``'s wrapped forward takes the input
    before ``child`` and its pre-hooks see it (so before a steer at ``child``'s ``:in``); a call of
    ``child`` on its own is taken by ``child``'s wrapped forward (after its pre-hooks). A handle
    with ``remove()``. Both forwards must take an instance ``forward`` (no scripted modules)."""
    relay = _Relay()
    outer, inner = _ParentInput(parent, fn), _ChildInput(child, fn)
    outer.relay = inner.relay = relay
    child.forward = inner  # type: ignore[method-assign]
    parent.forward = outer  # type: ignore[method-assign]
    return _Handles(_ForwardHandle(child, inner), _ForwardHandle(parent, outer))


def wrap_forward(module: torch.nn.Module, fn: Callable[[Any], None]) -> Any:
    """Call ``fn(output)`` after each forward of ``module``; a handle with ``remove()``.

    An instance ``forward`` where the module takes one, else (a scripted module) a forward hook."""
    if isinstance(module, torch.jit.ScriptModule):
        return module.register_forward_hook(lambda _m, _a, out: fn(out))
    wrapper = _Forward(module, fn)
    module.forward = wrapper  # type: ignore[method-assign]
    return _ForwardHandle(module, wrapper)
