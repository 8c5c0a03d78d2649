"""``attach()``: the one call a user adds to their agent.

Each tap gets a forward hook (``:out``) or a forward pre-hook (``:in``) that copies the tensor's
rows into a per-tap buffer and returns; a buffer is sent as one frame when it holds
``flush_rows`` rows or its oldest row is ``flush_ms`` old. While no monitor is connected the
hooks only count what they skip. Nothing here blocks the agent.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from agent_side import wire
from agent_side.sender import Sender
from agent_side.taps import as_rows, first_tensor, parse_tap, resolve

__all__ = ["attach", "Attachment", "DEFAULT_ENDPOINT"]

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"
_COPY_THRESHOLD = 64 * 1024
_FLOAT_DTYPES = (torch.float16, torch.float32, torch.float64)


class _Rows:
    """A coalescing buffer of rows for one stream (a tap, or one set of metric names)."""

    __slots__ = ("buf", "n", "marks", "t0", "lead", "calls")

    def __init__(self) -> None:
        self.buf: np.ndarray | None = None
        self.n = 0
        self.marks: list[tuple[int, int]] = []  # (step, rows) per forward or log call
        self.t0 = 0.0
        self.lead: list[int] = []
        self.calls = 0

    def fits(self, arr: np.ndarray, lead: list[int]) -> bool:
        b = self.buf
        return (
            b is not None
            and b.shape[1] == arr.shape[1]
            and b.dtype == arr.dtype
            and self.n + arr.shape[0] <= b.shape[0]
            and (self.n == 0 or lead == self.lead)
        )

    def add(self, arr: np.ndarray, step: int, lead: list[int], capacity: int) -> None:
        rows = arr.shape[0]
        b = self.buf
        if b is None or b.shape[1] != arr.shape[1] or b.dtype != arr.dtype or b.shape[0] < rows:
            self.buf = b = np.empty((max(capacity, rows), arr.shape[1]), dtype=arr.dtype)
        if self.n == 0:
            self.t0 = time.monotonic()
            self.lead = lead
        b[self.n : self.n + rows] = arr
        self.n += rows
        self.marks.append((step, rows))

    def take(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """The pending rows and their (step, index) positions; the buffer is free afterwards."""
        n = self.n
        data = self.buf[:n]
        pos = np.empty((n, 2), dtype=np.int64)
        if len(self.marks) == n:  # one row per call: the common RL case
            pos[:, 0] = [s for s, _ in self.marks]
            pos[:, 1] = 0
        else:
            steps = np.fromiter((s for s, _ in self.marks), dtype=np.int64, count=len(self.marks))
            counts = np.fromiter((r for _, r in self.marks), dtype=np.int64, count=len(self.marks))
            starts = np.cumsum(counts) - counts
            pos[:, 0] = np.repeat(steps, counts)
            pos[:, 1] = np.arange(n) - np.repeat(starts, counts)
        if data.nbytes >= _COPY_THRESHOLD:
            self.buf = np.empty_like(self.buf)  # ZeroMQ keeps a reference to the sent one
        self.n = 0
        self.marks = []
        return data, pos, self.lead


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
        endpoint: str | None = None,
        flush_rows: int = 64,
        flush_ms: float = 50.0,
        sndhwm: int = 128,
    ) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"attach() needs a torch.nn.Module, got {type(module).__name__}")
        if not run or not isinstance(run, str):
            raise ValueError("attach() needs a non-empty run name")
        if isinstance(taps, str):
            taps = [taps]
        specs = [parse_tap(t) for t in taps]
        if not specs:
            raise ValueError("attach() needs at least one tap")
        if len({str(s) for s in specs}) != len(specs):
            raise ValueError(f"duplicate taps in {list(map(str, specs))}")
        targets = [(s, resolve(module, s)) for s in specs]  # fails before anything is hooked
        self.run = run
        self.endpoint = endpoint or os.environ.get("INTERLATENT_ENDPOINT") or DEFAULT_ENDPOINT
        self.flush_rows = int(flush_rows)
        self._flush_s = flush_ms / 1000.0
        self.paused = False
        self.env_steps = False  # set by wrap() / the SB3 callback: steps come from the env
        self.step = 0
        self._sender = Sender(self.endpoint, run=run, sndhwm=sndhwm)
        self._taps: dict[str, _Rows] = {str(s): _Rows() for s in specs}
        self._metrics: dict[tuple[str, ...], _Rows] = {}
        self._episodes: list[list[float]] = []
        self._handles: list[Any] = []
        self._detached = False
        for spec, mod in targets:
            name = str(spec)
            if spec.site == "in":
                h = mod.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True)
            else:
                h = mod.register_forward_hook(self._post_hook(name))
            self._handles.append(h)
        log.info("attached %d taps of %s to %s as run %r", len(specs), type(module).__name__, self.endpoint, run)

    # -- hooks: the hot path ---------------------------------------------------------------
    def _pre_hook(self, name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if not self.paused:
                t = first_tensor(args)
                self._capture(name, t if t is not None else first_tensor(kwargs))

        return hook

    def _post_hook(self, name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if not self.paused:
                self._capture(name, first_tensor(output))

        return hook

    def _capture(self, name: str, t: torch.Tensor | None) -> None:
        if t is None:
            return
        stream = self._taps[name]
        step = self.step if self.env_steps else stream.calls
        stream.calls += 1
        if not self._sender.listening():
            self._sender.drops += t.numel() // max(1, t.shape[-1]) if t.dim() else 1
            return
        x, lead = as_rows(t.detach())
        if x.dtype not in _FLOAT_DTYPES:
            x = x.float()
        if x.device.type != "cpu":
            x = x.cpu()
        arr = x.numpy()
        if stream.n and not stream.fits(arr, lead):
            self._flush_tap(name, stream)
        stream.add(arr, step, lead, self.flush_rows)
        if stream.n >= self.flush_rows or time.monotonic() - stream.t0 >= self._flush_s:
            self._flush_tap(name, stream)

    def _flush_tap(self, name: str, stream: _Rows) -> None:
        data, pos, lead = stream.take()
        run = self.run
        self._sender.send(lambda pub, seq, drops: wire.encode_act(run, pub, seq, drops, name, data, pos, lead=lead), len(data))

    # -- metrics ----------------------------------------------------------------------------
    def log_rows(self, names: Sequence[str], values: np.ndarray, *, step: int | None = None) -> None:
        """Log metric rows ``values`` [rows, len(names)] at ``step`` (default: the current step)."""
        step = self.step if step is None else step
        key = tuple(names)
        if not self._sender.listening():
            self._sender.drops += len(values)
            return
        arr = np.ascontiguousarray(values, dtype=np.float64).reshape(-1, len(key))
        if not np.isfinite(arr).all():
            bad = [key[j] for j in np.nonzero(~np.isfinite(arr).all(axis=0))[0]]
            log.warning("not sending metrics with NaN/Inf at step %d: %s", step, bad)
            arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        stream = self._metrics.get(key)
        if stream is None:
            stream = self._metrics[key] = _Rows()
        if stream.n and not stream.fits(arr, []):
            self._flush_metrics(key, stream)
        stream.add(arr, step, [], self.flush_rows)
        if stream.n >= self.flush_rows or time.monotonic() - stream.t0 >= self._flush_s:
            self._flush_metrics(key, stream)

    def log(self, values: Mapping[str, float] | None = None, *, step: int | None = None, **named: float) -> None:
        """Log user metrics for the current step: ``tap.log(danger=0.3)``."""
        merged = {**(values or {}), **named}
        if merged:
            self.log_rows(list(merged), np.array([list(merged.values())], dtype=np.float64), step=step)

    def _flush_metrics(self, key: tuple[str, ...], stream: _Rows) -> None:
        data, pos, _ = stream.take()
        run = self.run
        self._sender.send(lambda pub, seq, drops: wire.encode_met(run, pub, seq, drops, key, data, pos), len(data))

    def end_episode(self, index: int, ret: float, length: int, terminated: bool, truncated: bool) -> None:
        """Record an episode end (the env wrapper calls this); sent with the next flush."""
        self._episodes.append([self.step, index, ret, length, float(terminated), float(truncated)])
        if len(self._episodes) >= self.flush_rows:
            self._flush_episodes()

    def _flush_episodes(self) -> None:
        eps, self._episodes = self._episodes, []
        if not eps:
            return
        if not self._sender.listening():
            self._sender.drops += len(eps)
            return
        run = self.run
        self._sender.send(lambda pub, seq, drops: wire.encode_ep(run, pub, seq, drops, eps), len(eps))

    def advance(self, n: int = 1) -> None:
        """Move to the next env step; flushes buffers that are old enough."""
        self.step += n
        now = time.monotonic()
        for key, stream in self._metrics.items():
            if stream.n and now - stream.t0 >= self._flush_s:
                self._flush_metrics(key, stream)
        if self._episodes:
            self._flush_episodes()

    # -- environments -----------------------------------------------------------------------
    def wrap(self, env: Any, obs_names: Sequence[str] | None = None, metrics: Mapping[str, Callable] | None = None) -> Any:
        """Wrap ``env`` so every step logs observations, action, reward and episode ends.

        A ``gymnasium.Env`` gets a ``gymnasium.Wrapper``; a gymnasium vector env or a
        stable-baselines3 ``VecEnv`` gets the matching vector wrapper (one row per env).
        ``metrics`` maps names to callables ``f(step: StepInfo) -> float``.
        """
        from agent_side.envwrap import wrap_env

        self.env_steps = True
        return wrap_env(self, env, obs_names=obs_names, metrics=metrics)

    def sb3_callback(self, obs_names: Sequence[str] | None = None, metrics: Mapping[str, Callable] | None = None) -> Any:
        """A stable-baselines3 callback for ``model.learn(callback=...)``: streams rollout forwards
        and their step metrics, and pauses the hooks during gradient updates."""
        from agent_side.sb3 import make_callback

        self.env_steps = True
        return make_callback(self, obs_names=obs_names, metrics=metrics)

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._sender.listening()

    def wait_for_monitor(self, timeout_s: float = 10.0) -> bool:
        """Block until a monitor is connected; returns False on timeout."""
        return self._sender.wait_connected(timeout_s)

    def counters(self) -> dict[str, Any]:
        """What this handle has done: messages sent (``seq``), records dropped, connection."""
        s = self._sender
        return {"run": self.run, "pub": s.pub, "sent": s.seq, "drops": s.drops, "connected": s.connected, "step": self.step}

    def flush(self) -> None:
        """Send everything buffered now."""
        for name, stream in self._taps.items():
            if stream.n:
                self._flush_tap(name, stream)
        for key, stream in self._metrics.items():
            if stream.n:
                self._flush_metrics(key, stream)
        self._flush_episodes()

    def detach(self, *, linger_ms: int = 1000) -> None:
        """Remove every hook, flush, and close the socket (waiting up to ``linger_ms`` for delivery)."""
        if self._detached:
            return
        self._detached = True
        for h in self._handles:
            h.remove()
        self._handles = []
        self.flush()
        self._sender.close(linger_ms=linger_ms)
        log.info("detached run %r: %s", self.run, self.counters())

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def attach(
    module: torch.nn.Module,
    taps: Iterable[str] | str,
    *,
    run: str,
    endpoint: str | None = None,
    flush_rows: int = 64,
    flush_ms: float = 50.0,
    sndhwm: int = 128,
) -> Attachment:
    """Stream the activations at ``taps`` of ``module`` to a monitor at ``endpoint``.

    ``taps`` are ``"module.name:in"`` or ``"module.name:out"``; unknown names fail here with
    close matches. ``endpoint`` defaults to ``$INTERLATENT_ENDPOINT`` or ``tcp://127.0.0.1:5557``.
    The agent may start before the monitor; frames are dropped and counted while none listens.
    """
    return Attachment(
        module, list(taps) if not isinstance(taps, str) else [taps], run=run, endpoint=endpoint,
        flush_rows=flush_rows, flush_ms=flush_ms, sndhwm=sndhwm,
    )
