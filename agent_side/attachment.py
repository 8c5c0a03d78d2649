"""``attach()``: the one call a user adds to their agent.

Each ``:out`` tap wraps its module's forward (torch's hooked call path costs about a microsecond a
module more, a wrapped forward almost nothing); each ``:in`` tap gets a forward pre-hook, first
among the module's pre-hooks, or, on the first module of an ``nn.Sequential``, the Sequential's
wrapped forward takes the input (:func:`agent_side.taps.wrap_first_input`). Either copies the
value into the tap's buffer (:class:`agent_side.taps.TapBuffer`) and returns; both see the value
before a steer at the same tap edits it. A buffer goes out as one frame when it holds
``flush_rows`` rows or its oldest row is ``flush_ms`` old, with every other stream's pending rows,
so the sends come few and together (metric rows and episode ends wait for the same). The hooks
are on the model only while a monitor is connected: with nobody listening, torch runs its
hook-free fast path and the agent pays nothing but a counter. Nothing here blocks the agent, but
``attach()`` itself, which waits up to ``connect_wait_s`` (default 1 s,
``$INTERLATENT_CONNECT_WAIT_S``) for a monitor that already listens, so a run started against a
live monitor streams from its first step; a refused connection (nobody listens) ends the wait at
once.

Steps the agent runs with no monitor connected are counted as ``unwatched`` (once a step, in
every frame's header), not as drops: nothing of them was built. A connection that comes in the
middle of an env step puts the hooks on at the next step boundary, so each step is either
streamed whole or counted unwatched, and a run's rows + unwatched + drops are its steps.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from agent_side import wire
from agent_side.control import Controller, greeting, load_agent_key, load_monitor_key, read_key
from agent_side.lm import TokenTracker, token_rows
from agent_side.routing import DEFAULT_FAILOVER_S, endpoints_from_env, parse_endpoints, rendezvous
from agent_side.sender import Sender
from agent_side.taps import (
    FLUSH_BYTES,
    SENDABLE,
    TapBuffer,
    TapSpec,
    as_rows,
    first_tensor,
    parse_tap,
    resolve_tap,
    sequential_parent,
    wrap_first_input,
    wrap_forward,
)
from agent_side.wire import DEFAULT_ENDPOINT

__all__ = ["attach", "Attachment", "DEFAULT_ENDPOINT"]

log = logging.getLogger(__name__)

CONNECT_WAIT_S = 1.0  # how long attach() waits for a monitor that already listens


def _env_float(name: str, default: float) -> float:
    """A number of seconds from the environment (unset or empty: ``default``), never negative."""
    text = os.environ.get(name, "").strip()
    try:
        value = float(text) if text else default
    except ValueError:
        raise ValueError(f"${name} must be a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise ValueError(f"${name} must be >= 0, got {text!r}")
    return value


class MetricRows:
    """One set of metric names' pending rows: flat lists of values and of (step, index) pairs,
    made arrays when sent (appending Python floats costs less than writing numpy cells). The env
    wrappers add to theirs directly (:meth:`Attachment.metric_rows`)."""

    __slots__ = ("owner", "width", "values", "pos")

    def __init__(self, owner: Attachment, width: int) -> None:
        self.owner = owner
        self.width = width
        self.values: list[float] = []
        self.pos: list[int] = []

    def add(self, row: list[float], step: int, index: int) -> None:
        """One row of ``width`` values at (step, index); sends everything once full."""
        if len(row) != self.width:
            raise ValueError(f"a metric row has {len(row)} values for {self.width} names")
        a = self.owner
        if not self.pos and a._due == math.inf:
            a._due = time.monotonic() + a._flush_s
        self.values += row
        self.pos += (step, index)
        if len(self.pos) >= 2 * a.flush_rows:
            a.flush()


# -- the capture path before issue 19 (hooks on both sites, a numpy copy per forward, a list per
# metric row, an episode frame per episode end), kept only so `interlatent bench hook` measures
# both side by side; Attachment(..., _legacy=True) runs it. Remove once its figures are written down.
class _TapRows:
    """Pending rows of one tap: a copied array and its step per forward, joined at flush."""

    __slots__ = ("name", "arrays", "steps", "rows", "max_rows", "due", "lead", "calls", "width")

    def __init__(self, name: str) -> None:
        self.name = name
        self.arrays: list[np.ndarray] = []
        self.steps: list[int] = []
        self.rows = 0
        self.max_rows = 1
        self.due = 0.0  # when the oldest pending row must go out
        self.lead: list[int] = []
        self.calls = 0
        self.width = -1

    def take(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """The pending rows [n, width] and their (step, index) positions; empties the buffer."""
        arrays, steps = self.arrays, self.steps
        data = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        n = data.shape[0]
        pos = np.zeros((n, 2), dtype=np.int64)
        if n == len(arrays) and min(a.shape[0] for a in arrays) == 1:  # one row per forward: the common RL case
            pos[:, 0] = steps
        else:
            counts = np.fromiter((a.shape[0] for a in arrays), dtype=np.int64, count=len(arrays))
            pos[:, 0] = np.repeat(np.asarray(steps, dtype=np.int64), counts)
            pos[:, 1] = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
        self.arrays, self.steps, self.rows = [], [], 0
        return data, pos, self.lead


class _LegacyMetricRows:
    """Coalescing buffer for one set of metric names: plain Python rows until flush."""

    __slots__ = ("rows", "pos", "t0")

    def __init__(self) -> None:
        self.rows: list[list[float]] = []
        self.pos: list[tuple[int, int]] = []
        self.t0 = 0.0


def _in_hook(capture: Callable[[Any], None]) -> Callable[..., None]:
    """An ``:in`` tap's forward pre-hook: the first tensor of the call's inputs to ``capture``."""

    # kwargs is optional: a hook removed between torch's snapshot and its call is called without it
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> None:
        if args and type(args[0]) is torch.Tensor:
            capture(args[0])
            return
        t = first_tensor(args)
        capture(t if t is not None else first_tensor(kwargs))

    return hook


class Attachment:
    """The handle :func:`attach` returns: a context manager with ``detach()``.

    Example::

        with agent_side.attach(model.policy, ["mlp_extractor.policy_net.0:in"], run="eval") as tap:
            env = tap.wrap(env, obs_names=["cart_pos", "cart_vel", "pole_angle", "angle_vel"])
            ...
    """

    def __init__(
        self,
        module: torch.nn.Module,
        taps: Sequence[str],
        *,
        run: str,
        endpoint: str | Sequence[str] | None = None,
        flush_rows: int = 256,
        flush_ms: float = 100.0,
        sndhwm: int = 128,
        allow_control: bool = False,
        control_endpoint: str | Sequence[str] | None = None,
        monitor_key: str | bytes | None = None,
        agent_key: str | None = None,
        connect_wait_s: float | None = None,
        failover_s: float | None = None,
        _legacy: bool = False,
    ) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"attach() needs a torch.nn.Module, got {type(module).__name__}")
        if not run or not isinstance(run, str):
            raise ValueError("attach() needs a non-empty run name")
        specs = [parse_tap(t) for t in taps]
        if not specs:
            raise ValueError("attach() needs at least one tap")
        # resolved first: a TransformerLens hook name streams as itself, wherever it is hooked
        self._targets: list[tuple[TapSpec, torch.nn.Module]] = [resolve_tap(module, s) for s in specs]
        specs = [s for s, _ in self._targets]
        if len({str(s) for s in specs}) != len(specs):
            raise ValueError(f"duplicate taps in {[str(s) for s in specs]}")
        self._per_position = {str(s) for s in specs if s.per_position}  # [batch, pos, head, d] -> a row per pos
        self._module = module
        self._extra_hooks: list[Callable[[], Any]] = []  # registered with the taps: track_tokens()
        self._trackers: list[TokenTracker] = []
        self.run = run
        given = endpoints_from_env(DEFAULT_ENDPOINT) if endpoint is None or endpoint == "" else parse_endpoints(endpoint)
        self.endpoints = rendezvous(run, given)  # the run's order: every agent and monitor computes the same
        self.endpoint = self.endpoints[0]  # the run's first choice
        if failover_s is None:
            failover_s = _env_float("INTERLATENT_FAILOVER_S", DEFAULT_FAILOVER_S)
        self.flush_rows = int(flush_rows)
        self._flush_s = flush_ms / 1000.0
        self.paused = False
        self.env_steps = False  # set by wrap() / the SB3 callback: steps come from the env
        self.step = 0
        self._prompts = 0  # forwards named by tokens()
        self._legacy = bool(_legacy)
        self._taps: dict[str, Any] = {
            str(s): _TapRows(str(s))
            if self._legacy
            else TapBuffer(
                str(s),
                per_position=s.per_position,
                flush_rows=self.flush_rows,
                flush_s=self._flush_s,
                emit=functools.partial(self._send_rows, str(s)),
            )
            for s in specs
        }
        # a replica nn.DataParallel makes shares its module's attributes, so an instance forward
        # would run the original's: hooks only there
        self._hooks_only = any(isinstance(m, (torch.nn.DataParallel, torch.jit.ScriptModule)) for m in module.modules())
        # an :in tap on the first module of an nn.Sequential: its input is the Sequential's
        self._parents = {str(s): sequential_parent(module, s, m) for s, m in self._targets}
        self._metrics: dict[tuple[str, ...], Any] = {}
        self._episodes: list[list[float]] = []
        self._due = math.inf  # when the oldest pending metric row or episode end must go out
        self._handles: list[Any] = []
        self._arm_lock = threading.Lock()
        self._detached = False
        self._watching = False  # the hooks were on when the current step began
        self._arm_due = False  # a monitor connected mid-step: hooks go on at the next step boundary
        self._warned: set[str] = set()
        keypair = load_agent_key(agent_key or os.environ.get("INTERLATENT_AGENT_KEY"))
        server_key = None
        if keypair is not None:  # a remote agent: the data channel is CURVE too, so the key must be there now
            found = load_monitor_key(monitor_key)
            server_key = found if isinstance(found, bytes) else read_key(found)
            if server_key is None:
                raise ValueError(f"agent_key is set, so the monitor's public key is needed now; none at {str(found)}")
        control = control_endpoint or os.environ.get("INTERLATENT_CONTROL_ENDPOINT")
        self._control = (
            Controller(
                module,
                run=run,
                # every monitor of the tier: the one that holds the run's lease steers it
                endpoint=parse_endpoints(control, source="control_endpoint")
                if control
                else [wire.control_endpoint(e) for e in self.endpoints],
                monitor_key=server_key or load_monitor_key(monitor_key),
                keypair=keypair,
                width_of=lambda t: self._taps[t].width if t in self._taps else None,
                step_of=lambda: self.step,
            )
            if allow_control
            else None
        )
        self._sender = Sender(
            self.endpoints,
            sndhwm=sndhwm,
            on_change=self._on_connection,
            greeting=greeting(run, self._control),
            curve_serverkey=server_key,
            curve_keypair=keypair,
            failover_s=failover_s,
            run=run,
        )
        if self._control is not None:
            self._control.start(self._sender)
        if connect_wait_s is None:
            connect_wait_s = _env_float("INTERLATENT_CONNECT_WAIT_S", CONNECT_WAIT_S)
        if connect_wait_s > 0:
            self._sender.wait_settled(connect_wait_s)
        self._watching = bool(self._handles)
        log.info("attached %d taps of %s to %s as run %r", len(specs), type(module).__name__, ", ".join(self.endpoints), run)

    # -- hooks on while a monitor listens -----------------------------------------------------
    def _on_connection(self, connected: bool) -> None:
        """Called from the sender's watcher thread. Torch snapshots a module's hook dicts before
        calling them, so adding or removing hooks while the agent runs a forward is safe."""
        with self._arm_lock:
            if connected and self.env_steps:
                self._arm_due = True  # the step under way began unwatched: it stays so, whole
            elif connected:
                self._arm()
                self._watching = True  # no env steps yet: the forwards from now on are captured
            else:
                self._arm_due = False
                self._disarm()

    def _arm(self) -> None:
        if not self._handles and not self._detached:
            for spec, mod in self._targets:
                name = str(spec)
                if self._legacy:
                    if spec.site == "in":
                        self._handles.append(mod.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
                    else:
                        self._handles.append(mod.register_forward_hook(self._post_hook(name)))
                    continue
                capture = self._capture_to(self._taps[name])
                parent = self._parents[name]
                if spec.site == "in" and parent is not None and not self._hooks_only:
                    self._handles.append(wrap_first_input(parent, mod, capture))  # before the module's pre-hooks
                elif spec.site == "in":
                    # first among the module's pre-hooks: the tap sees the input before a steer edits it
                    self._handles.append(mod.register_forward_pre_hook(_in_hook(capture), with_kwargs=True, prepend=True))
                elif self._hooks_only:
                    self._handles.append(
                        mod.register_forward_hook(lambda _m, _a, out, capture=capture: capture(out), prepend=True)
                    )
                else:
                    self._handles.append(wrap_forward(mod, capture))
            self._handles.extend(add() for add in self._extra_hooks)

    def _disarm(self) -> None:
        for h in reversed(self._handles):  # last on, first off: wrapped forwards unwind in order
            h.remove()
        self._handles = []

    def _capture_to(self, b: TapBuffer) -> Callable[[Any], None]:
        """The hot path: the value's first tensor into the tap's buffer; everything sent when due."""

        def capture(value: Any) -> None:
            if self.paused:
                return
            try:
                t = value if type(value) is torch.Tensor else first_tensor(value)
                if t is None:
                    return
                if b.put(t, self.step if self.env_steps else b.calls):
                    self.flush()  # every stream at once: back-to-back sends are cheap, lone ones are not
                elif b.due < self._due:  # rows pending that the next advance() does not know of
                    if self.env_steps:
                        self._due = b.due
                    elif time.monotonic() >= b.due:  # no env steps to send them: the forwards do
                        self.flush()
            except Exception:
                self._failed(b.name)

        return capture

    def _send_rows(self, name: str, data: np.ndarray, pos: np.ndarray, lead: list[int]) -> None:
        """Send a tap's rows as frames of about FLUSH_BYTES at most (one huge forward goes in pieces)."""
        run = self.run
        step = max(1, FLUSH_BYTES // max(1, data[0].nbytes))
        for i in range(0, len(data), step):
            d, p = data[i : i + step], pos[i : i + step]

            def build(pub: str, seq: int, drops: int, uw: int, d: np.ndarray = d, p: np.ndarray = p) -> list[Any]:
                return wire.encode_act(run, pub, seq, drops, name, d, p, lead=lead, unwatched=uw)

            self._sender.send(build, len(d))

    def _failed(self, where: str) -> None:
        """Watching must never break the agent: count the record as dropped, say so once."""
        self._sender.drops += 1
        if where not in self._warned:
            self._warned.add(where)
            log.warning("interlatent could not capture %s; skipping such records (counted as drops)", where, exc_info=True)

    # -- the legacy capture path (see _TapRows) -----------------------------------------------
    def _pre_hook(self, name: str) -> Callable:
        s = self._taps[name]

        # kwargs is optional: a hook removed between torch's snapshot and its call is called
        # without it, and must still not fail
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> None:
            if not self.paused:
                t = args[0] if args and type(args[0]) is torch.Tensor else first_tensor(args)
                if t is None:
                    t = first_tensor(kwargs)
                if t is not None:
                    try:
                        self._capture(s, t)
                    except Exception:
                        self._failed(s.name)

        return hook

    def _post_hook(self, name: str) -> Callable:
        s = self._taps[name]

        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if self.paused:
                return
            t = output if type(output) is torch.Tensor else first_tensor(output)
            if t is not None:
                try:
                    self._capture(s, t)
                except Exception:
                    self._failed(s.name)

        return hook

    def _capture(self, s: _TapRows, t: torch.Tensor) -> None:
        """The hot path: copy the rows, note the step; send everything when due."""
        step = self.step if self.env_steps else s.calls
        s.calls += 1
        if t.dtype is torch.float32 and t.dim() == 2 and t.is_cpu and not t.requires_grad and t.shape[1] == s.width and s.arrays:
            arr = t.numpy().copy()  # the copy: later in-place ops on t cannot touch the frame
        else:
            first = self._first_of_kind(s, t)
            if first is None:
                return
            arr = first
        s.arrays.append(arr)
        s.steps.append(step)
        s.rows += arr.shape[0]
        if s.rows >= s.max_rows or time.monotonic() >= s.due:
            self.flush()  # every stream at once: back-to-back sends are cheap, lone ones are not

    def _first_of_kind(self, s: _TapRows, t: torch.Tensor) -> np.ndarray | None:
        """The general path: any dtype, device and rank; starts a new frame when needed."""
        if t.requires_grad:
            t = t.detach()
        if t.dim() == 2:
            lead: list[int] = []
        else:
            t, lead = as_rows(t, per_position=s.name in self._per_position)
        if t.dtype not in SENDABLE:
            t = t.float()
        if not t.is_cpu:
            t = t.cpu()
        arr = t.numpy().copy()
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            return None
        if s.arrays and (arr.shape[1] != s.width or lead != s.lead):
            self._flush_tap(s)
        if not s.arrays:
            s.width = arr.shape[1]
            s.lead = lead
            s.due = time.monotonic() + self._flush_s
            # a frame holds at most flush_rows rows, and about _FLUSH_BYTES for wide taps
            s.max_rows = max(1, min(self.flush_rows, FLUSH_BYTES // arr[0].nbytes))
        return arr

    def _flush_tap(self, s: _TapRows) -> None:
        self._send_rows(s.name, *s.take())

    # -- metrics ----------------------------------------------------------------------------
    def log_row(self, names: tuple[str, ...], row: list[float], *, index: int = 0, step: int | None = None) -> None:
        """Log one metric row (values in the order of ``names``) at ``step`` (default: now)."""
        if not self._sender.connected:
            if not self.env_steps:  # an env step's rows are part of its unwatched step
                self._sender.drops += 1
            return
        if self._legacy:
            return self._log_row_legacy(names, row, index, step)
        m = self._metrics.get(names) or self.metric_rows(names)
        m.add(row, self.step if step is None else step, index)

    def metric_rows(self, names: tuple[str, ...]) -> MetricRows:
        """The pending rows of this set of metric names (the env wrappers add to them directly)."""
        m = self._metrics.get(names)
        if m is None:
            m = self._metrics[names] = MetricRows(self, len(names))
        return m

    def _log_row_legacy(self, names: tuple[str, ...], row: list[float], index: int, step: int | None) -> None:
        m = self._metrics.get(names)
        if m is None:
            m = self._metrics[names] = _LegacyMetricRows()
        if not m.rows:
            m.t0 = time.monotonic()
        m.rows.append(row)
        m.pos.append((self.step if step is None else step, index))
        if len(m.rows) >= self.flush_rows:
            self.flush()

    def dropped(self, records: int = 1) -> None:
        """Count records that were not built because no monitor is connected."""
        self._sender.drops += records

    def log(self, values: Mapping[str, float] | None = None, *, step: int | None = None, **named: float) -> None:
        """Log user metrics for the current step: ``tap.log(danger=0.3)``."""
        merged = {**(values or {}), **named}
        if merged:
            self.log_row(tuple(merged), [float(v) for v in merged.values()], step=step)

    def _flush_metrics(self, names: tuple[str, ...], m: Any) -> None:
        if self._legacy:
            data = np.array(m.rows, dtype=np.float64).reshape(len(m.rows), len(names))
            m.rows = []
        else:
            data = np.array(m.values, dtype=np.float64).reshape(-1, len(names))
            m.values = []
        pos = np.array(m.pos, dtype=np.int64).reshape(-1, 2)
        m.pos = []
        if not np.isfinite(data).all():
            bad = [names[j] for j in np.nonzero(~np.isfinite(data).all(axis=0))[0]]
            log.warning("metrics %s had NaN/Inf values; sent as 0", bad)
            data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
        run = self.run
        self._sender.send(
            lambda pub, seq, drops, uw: wire.encode_met(run, pub, seq, drops, names, data, pos, unwatched=uw), len(data)
        )

    def end_episode(self, index: int, ret: float, length: int, terminated: bool, truncated: bool) -> None:
        """Record an episode end (the env wrappers call this); sent with the step's metric rows,
        at most ``flush_ms`` later (on the next ``advance()`` with the legacy path)."""
        if not self._episodes and self._due == math.inf:
            self._due = time.monotonic() + self._flush_s
        self._episodes.append([self.step, index, ret, length, float(terminated), float(truncated)])

    def _flush_episodes(self) -> None:
        eps, self._episodes = self._episodes, []
        if not self._sender.connected:
            if not self.env_steps:
                self._sender.drops += len(eps)
            return
        run = self.run
        self._sender.send(lambda pub, seq, drops, uw: wire.encode_ep(run, pub, seq, drops, eps, unwatched=uw), len(eps))

    def advance(self, n: int = 1) -> None:
        """Move to the next env step; sends metric buffers that are old enough."""
        if not self._watching:
            self._sender.unwatched += n
        if self._arm_due:
            with self._arm_lock:
                if self._arm_due:
                    self._arm_due = False
                    self._arm()
        self._watching = bool(self._handles)
        self.step += n
        if self._control is not None:
            self._control.step()
        if self._legacy:
            if self._episodes:
                self._flush_episodes()
            if self._metrics:
                now = time.monotonic()
                for m in self._metrics.values():
                    if m.rows and now - m.t0 >= self._flush_s:
                        self.flush()
                        break
        elif self._due != math.inf and time.monotonic() >= self._due:
            self.flush()

    # -- language models --------------------------------------------------------------------
    def tokens(
        self,
        tokens: Sequence[str] | Sequence[Sequence[str]],
        *,
        context: Sequence[str] | Sequence[Sequence[str]] | None = None,
        start: int = 0,
        max_chars: int = 64,
    ) -> None:
        """Name the tokens of the next forward (``tok.convert_ids_to_tokens(ids[0])``), or of a batch
        of equal-length prompts. Each call is one step; token row ``b * T + t`` gets the metric
        ``token_pos`` = ``start + t``. A generation step passes the tokens it continues as
        ``context`` and its position as ``start``; :meth:`track_tokens` does all this by itself."""
        rows, n_ctx, length = token_rows(tokens, context, start, max_chars=max_chars)
        self._new_forward()
        if not self._sender.connected:
            return  # the forward's step is counted unwatched
        run, step = self.run, self.step
        self._sender.send(
            lambda pub, seq, drops, uw: wire.encode_tok(
                run, pub, seq, drops, step, rows, context=n_ctx, start=start, unwatched=uw
            ),
            1,
        )
        for i in range(len(rows) * length):
            self.log_row(("token_pos",), [float(start + i % length)], index=i)

    def _new_forward(self) -> None:
        """The next forward is a step of its own (named by tokens(), or one the tracker cannot name)."""
        self.env_steps = True
        if self._prompts:
            self.advance()
        self._prompts += 1

    def track_tokens(self, tokenizer: Any, *, module: torch.nn.Module | None = None, context: int = 32) -> None:
        """Name every forward's tokens from its ``input_ids``, for teacher-forced prompts and
        ``generate()`` alike (a cached generation step is shown with the ``context`` tokens it
        continues). ``module`` is the model that receives ``input_ids`` (default: the attached one).
        With beam search the beams are reordered between steps, so a step's context may be another
        beam's; a forward without ``input_ids`` (``inputs_embeds``) is a step with no token names."""
        tracker = TokenTracker(self, tokenizer, context=context)
        self._trackers.append(tracker)
        target = module if module is not None else self._module

        def add() -> Any:  # first among the model's pre-hooks: the step moves on before any tap sees the forward
            return target.register_forward_pre_hook(tracker.hook, with_kwargs=True, prepend=True)

        with self._arm_lock:
            self._extra_hooks.append(add)
            if self._handles:  # a monitor already listens
                self._handles.append(add())

    # -- environments -----------------------------------------------------------------------
    def wrap(self, env: Any, *, obs_names: Sequence[str] | None = None, metrics: Mapping[str, Callable] | None = None) -> Any:
        """Wrap ``env`` so every step logs observations, action, reward and episode ends.

        A ``gymnasium.Env`` gets a ``gymnasium.Wrapper``; a gymnasium vector env or a
        stable-baselines3 ``VecEnv`` gets the matching vector wrapper (one row per env).
        ``metrics`` maps names to callables ``f(step: StepInfo) -> float``.
        """
        from agent_side.envwrap import wrap_env

        self.env_steps = True
        return wrap_env(self, env, obs_names=obs_names, metrics=metrics)

    def sb3_callback(self, *, obs_names: Sequence[str] | None = None, metrics: Mapping[str, Callable] | None = None) -> Any:
        """A stable-baselines3 callback for ``model.learn(callback=...)``: streams rollout forwards
        and their step metrics, and pauses the hooks during gradient updates."""
        from agent_side.sb3 import make_callback

        self.env_steps = True
        return make_callback(self, obs_names=obs_names, metrics=metrics)

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._sender.connected

    def wait_for_monitor(self, timeout_s: float = 10.0) -> bool:
        """Block until a monitor is connected (and the hooks are on); False on timeout. Call it
        between steps: the step that follows is streamed whole."""
        if not self._sender.wait_connected(timeout_s):
            return False
        with self._arm_lock:
            if self._arm_due and self._sender.connected:
                self._arm_due = False
                self._arm()
            self._watching = bool(self._handles)
        return True

    def counters(self) -> dict[str, Any]:
        """What this handle has done: messages sent, records dropped, connection, current step."""
        s = self._sender
        return {
            "run": self.run,
            "pub": s.pub,
            "sent": s.seq,
            "drops": s.drops,
            "unwatched": s.unwatched,
            "handshake_failures": s.handshake_failures,
            "connected": s.connected,
            "target": s.target,
            "failovers": s.failovers,
            "step": self.step,
            "tokens_unplaced": sum(t.unplaced for t in self._trackers),
            **(self._control.counters() if self._control is not None else {"control": False}),
        }

    def flush(self) -> None:
        """Send everything buffered now."""
        self._due = math.inf
        for s in self._taps.values():
            if self._legacy:
                if s.arrays:
                    self._flush_tap(s)
            else:
                s.flush()
        for names, m in self._metrics.items():
            if m.pos:
                self._flush_metrics(names, m)
        if self._episodes:
            self._flush_episodes()

    def detach(self, *, linger_ms: int = 3000) -> None:
        """Remove every hook, flush, and close the socket, waiting up to ``linger_ms`` for the last
        frames to leave (no wait when they already have, or when no monitor is connected)."""
        with self._arm_lock:
            if self._detached:
                return
            self._detached = True
            self._disarm()
        if self._control is not None:
            self._control.close()
        self.flush()
        self._sender.close(linger_ms=linger_ms)
        log.info("detached run %r: %s", self.run, self.counters())

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def attach(
    module: torch.nn.Module,
    taps: Iterable[str] | str,
    *,
    run: str,
    endpoint: str | Sequence[str] | None = None,
    flush_rows: int = 256,
    flush_ms: float = 100.0,
    sndhwm: int = 128,
    allow_control: bool = False,
    control_endpoint: str | Sequence[str] | None = None,
    monitor_key: str | bytes | None = None,
    agent_key: str | None = None,
    connect_wait_s: float | None = None,
    failover_s: float | None = None,
) -> Attachment:
    """Stream the activations at ``taps`` of ``module`` to a monitor at ``endpoint``.

    ``taps`` are ``"module.name:in"`` or ``"module.name:out"``; unknown names fail here with
    close matches. A language model's tap may be a TransformerLens hook name
    (``"blocks.3.hook_resid_post"``, on a HookedTransformer or a HuggingFace model
    :mod:`agent_side.hooknames` maps), streamed under that name.
    ``endpoint`` is one monitor, or a tier of them (a list, or a comma-separated string); it
    defaults to ``$INTERLATENT_ENDPOINTS`` (comma separated), else ``$INTERLATENT_ENDPOINT``, else
    ``tcp://127.0.0.1:5557``. With several, the run streams to one at a time, the first reachable in
    :func:`agent_side.routing.rendezvous` order, and moves down that order when its monitor has been
    gone ``failover_s`` (default 3, ``$INTERLATENT_FAILOVER_S``), back once an earlier one has stayed
    connected max(0.5 s, failover_s / 3) (:mod:`agent_side.sender`).
    The agent may start before the monitor, and the monitor may come and go: while none is
    connected, nothing is copied and what would have been sent is counted as dropped.
    ``allow_control=True`` lets ``interlatent steer`` steer this module live (see :mod:`agent_side.control`;
    ``control_endpoint`` (one, a list or a comma-separated string) defaults to
    ``$INTERLATENT_CONTROL_ENDPOINT`` or each endpoint's port + 1, every monitor's). The
    control channel is CURVE: ``monitor_key`` is the monitor's public key (z85 text, or the path of its
    ``monitor.key`` file; default ``$INTERLATENT_MONITOR_KEY``, else ``DATA_DIR/curve/monitor.key``), and
    a control socket that cannot prove it is never listened to. ``agent_key`` (default
    ``$INTERLATENT_AGENT_KEY``) is the path of this agent's secret certificate (``interlatent keys
    agent NAME``) for a monitor started with ``--allow-keys``: data and control channels are then
    CURVE both ways, and the monitor's public key must be at hand when attach() is called.
    ``connect_wait_s`` (default 1, ``$INTERLATENT_CONNECT_WAIT_S``; 0: no wait) is how long this call
    waits for a monitor that already listens; a refused connection ends the wait at once.
    """
    return Attachment(
        module,
        [taps] if isinstance(taps, str) else list(taps),
        run=run,
        endpoint=endpoint,
        flush_rows=flush_rows,
        flush_ms=flush_ms,
        sndhwm=sndhwm,
        allow_control=allow_control,
        control_endpoint=control_endpoint,
        monitor_key=monitor_key,
        agent_key=agent_key,
        connect_wait_s=connect_wait_s,
        failover_s=failover_s,
    )
