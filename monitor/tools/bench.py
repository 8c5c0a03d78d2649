"""``interlatent bench``: speed measured side by side in one run, reported as ratios.

``hook``: the SB3 CartPole predict+step loop plain, attached with no monitor, attached to a bare
sink (a process that only receives: the agent's own cost of capturing and sending), and attached
to a live monitor (the sink's cost plus the monitor's work competing for the same cores), in
interleaved rounds (A B C D A B C D ...), so drift of a noisy machine hits every variant alike;
the median of the per-round ratios is reported with min and max. Then the
monitor's ingest rate: bare ``wire.decode`` (the decode limit), the monitor's full per-frame
work in-process, and end to end over a socket from a sending process.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["bench_hook", "bench_ingest", "bench_alerts"]

INGEST_WIDTH = 64
INGEST_ROWS = 64  # rows per frame (the agent sends up to 256; smaller frames are the harder case)


def _loop(model: Any, env: Any, steps: int) -> float:
    obs, _ = env.reset(seed=0)
    t0 = time.perf_counter()
    for _ in range(steps):
        action, _ = model.predict(obs, deterministic=True)
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset()
    return steps / (time.perf_counter() - t0)


def _sink(endpoint: str) -> None:
    """Receive and discard until a ``stop`` message: a peer that costs the agent nothing."""
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.bind(endpoint)
    while s.recv_multipart() != [b"stop"]:
        pass
    s.close(linger=0)
    ctx.term()


def _stop_sink(endpoint: str) -> None:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.connect(endpoint)
    s.send(b"stop")
    s.close(linger=2000)
    ctx.term()


def _ratios(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def bench_hook(*, rounds: int = 7, steps: int = 2000, warmup: int = 300) -> dict[str, Any]:
    """Steps/s of plain, attached-no-monitor and attached-with-monitor loops, interleaved."""
    import gymnasium as gym

    import agent_side
    from monitor.store.embedded import EmbeddedRedis, free_port
    from monitor.tools.demo import CARTPOLE_OBS, DEMO_TAPS, make_ppo
    from monitor.tools.services import Services

    model = make_ppo()
    live_ep = f"tcp://127.0.0.1:{free_port()}"
    dead_ep = f"tcp://127.0.0.1:{free_port()}"  # nobody binds it
    sink_ep = f"tcp://127.0.0.1:{free_port()}"
    plain, nomon, sunk, live = [], [], [], []

    def attached(endpoint: str, run: str) -> float:
        with agent_side.attach(model.policy, DEMO_TAPS, run=run, endpoint=endpoint) as tap:
            if endpoint != dead_ep and not tap.wait_for_monitor(10):
                raise RuntimeError(f"benchmark peer at {endpoint} did not connect")
            return _loop(model, tap.wrap(gym.make("CartPole-v1"), obs_names=CARTPOLE_OBS), steps)

    sink = mp.get_context("spawn").Process(target=_sink, args=(sink_ep,), daemon=True)
    sink.start()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="il-bench-") as tmp,
            EmbeddedRedis(Path(tmp), persist=False, write_url=False) as url,
        ):
            with Services(
                data_dir=Path(tmp),
                redis_url=url,
                endpoint=live_ep,
                log_dir=Path(tmp),
                explainer=False,
                extra_monitor_args=["--metrics-port", "-1"],
            ):
                env = gym.make("CartPole-v1")
                _loop(model, env, warmup)
                for _ in range(rounds):
                    plain.append(_loop(model, env, steps))
                    nomon.append(attached(dead_ep, "bench-nomon"))
                    sunk.append(attached(sink_ep, "bench-sink"))
                    live.append(attached(live_ep, "bench-live"))
    finally:
        _stop_sink(sink_ep)
        sink.join(timeout=10)
        if sink.is_alive():
            sink.kill()
    return {
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "steps_per_round": steps,
        "taps": DEMO_TAPS,
        "steps_per_s": {
            "plain": statistics.median(plain),
            "attached_no_monitor": statistics.median(nomon),
            "attached_sink": statistics.median(sunk),
            "attached_monitor": statistics.median(live),
        },
        # the same cost in absolute terms: what an agent with a heavier step would pay
        "overhead_us_per_step": {
            k: round(1e6 * (1 / statistics.median(v) - 1 / statistics.median(plain)), 1)
            for k, v in (("attached_no_monitor", nomon), ("attached_sink", sunk), ("attached_monitor", live))
        },
        "ratio_no_monitor": _ratios([b / a for a, b in zip(plain, nomon, strict=True)]),
        "ratio_sink": _ratios([b / a for a, b in zip(plain, sunk, strict=True)]),
        "ratio_monitor": _ratios([c / a for a, c in zip(plain, live, strict=True)]),
    }


def _frames(n: int) -> list[list[bytes]]:
    from agent_side import wire

    rng = np.random.default_rng(0)
    data = rng.standard_normal((INGEST_ROWS, INGEST_WIDTH)).astype(np.float32)
    pos = np.zeros((INGEST_ROWS, 2), dtype=np.int64)
    out = []
    for i in range(n):
        pos[:, 0] = np.arange(i * INGEST_ROWS, (i + 1) * INGEST_ROWS)
        out.append([bytes(p) for p in wire.encode_act("bench-ingest", "p0", i, 0, "layer:out", data, pos)])
    return out


def _sender(endpoint: str, n: int) -> None:
    import zmq

    frames = _frames(n)
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 100_000)
    s.connect(endpoint)
    for parts in frames:
        s.send_multipart(parts)  # blocking: this measures the monitor, nothing may drop
    s.close(linger=-1)
    ctx.term()


def bench_ingest(*, frames: int = 5000) -> dict[str, Any]:
    """Rows/s: bare decode, the monitor's in-process handling, and end to end over a socket."""
    from agent_side import wire
    from monitor.service.ingest import Monitor
    from monitor.store.embedded import EmbeddedRedis
    from monitor.store.records import Store, connect

    msgs = _frames(frames)
    t0 = time.perf_counter()
    for parts in msgs:
        wire.decode(parts)
    decode_rps = frames * INGEST_ROWS / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory(prefix="il-bench-") as tmp, EmbeddedRedis(Path(tmp), persist=False, write_url=False) as url:
        store = Store(connect(url))
        mon = Monitor(store, endpoint="tcp://127.0.0.1:0")
        t0 = time.perf_counter()
        for parts in msgs:
            mon.handle(parts)
        mon.flush()
        handle_rps = frames * INGEST_ROWS / (time.perf_counter() - t0)
        store.r.flushdb()
        mon.runs.clear()

        ctx = mp.get_context("spawn")
        p = ctx.Process(target=_sender, args=(mon.endpoint, frames))
        p.start()
        first = mon.run(max_frames=1, idle_exit_s=30)  # start the clock at the first frame
        t0 = time.perf_counter()
        res = mon.run(max_frames=frames - 1, idle_exit_s=10)
        socket_rps = res.rows / (time.perf_counter() - t0)
        p.join()
        mon.close()
    return {
        "width": INGEST_WIDTH,
        "rows_per_frame": INGEST_ROWS,
        "frames": frames,
        "dtype": "float32",
        "decode_rows_per_s": decode_rps,
        "monitor_rows_per_s": handle_rps,
        "socket_rows_per_s": socket_rps,
        "monitor_vs_decode": handle_rps / decode_rps,
        "rejected": res.rejected,
        "received": first.frames + res.frames,
    }


def bench_stats(
    *, widths: tuple[int, ...] = (8, 512, 16384), metrics: int = 8, window: int = 1000, steps: int = 300, frame_rows: int = 64
) -> dict[str, Any]:
    """Per-step cost of the live statistics against ``metrics`` metrics, and river's rolling
    Pearson (one object per channel-metric pair) on the same data."""
    from monitor.stats.analytics import AnalyticsConfig, TapAnalytics
    from monitor.stats.rolling import RollingCorr

    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"metrics": metrics, "window_steps": window, "rows": []}
    river_us = _river_pair_us(window, rng)
    for width in widths:
        x = rng.standard_normal((steps + window, width))
        y = rng.standard_normal((steps + window, metrics))
        keys = np.arange(steps + window, dtype=np.int64) << 24
        rc = RollingCorr(width, metrics, window=window)
        rc.update(x[:window], y[:window])
        t0 = time.perf_counter()
        for i in range(window, window + steps):
            rc.update(x[i : i + 1], y[i : i + 1])
        corr_us = (time.perf_counter() - t0) / steps * 1e6
        an = TapAnalytics(width, [f"m{j}" for j in range(metrics)], AnalyticsConfig(window_steps=window))
        an._update(x[:window], y[:window], keys[:window])
        t0 = time.perf_counter()
        for i in range(window, window + steps, frame_rows):
            an._update(x[i : i + frame_rows], y[i : i + frame_rows], keys[i : i + frame_rows])
        full_us = (time.perf_counter() - t0) / steps * 1e6
        river_step_us = river_us * width * metrics
        out["rows"].append(
            {
                "latents": width,
                "rolling_pearson_us_per_step": corr_us,
                "all_analytics_us_per_row_in_frames": full_us,
                "river_us_per_step": river_step_us,
                "river_measured": width == widths[0],
                "speedup_vs_river": river_step_us / corr_us,
            }
        )
    out["river_us_per_pair_update"] = river_us
    out["frame_rows"] = frame_rows
    return out


def _river_pair_us(window: int, rng: np.random.Generator, n: int = 20000) -> float:
    import warnings

    from river import stats, utils

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        rp = utils.Rolling(stats.PearsonCorr(), window_size=window)
    xs, ys = rng.standard_normal(n).tolist(), rng.standard_normal(n).tolist()
    t0 = time.perf_counter()
    for a, b in zip(xs, ys, strict=True):
        rp.update(a, b)
    return (time.perf_counter() - t0) / n * 1e6


ENCODE_SHAPES = ((4, 4), (64, 8), (512, 4096), (4096, 16384))  # (d_in, latents)


def bench_encode(*, rows: int = 256, rounds: int = 5, budget_s: float = 0.3) -> dict[str, Any]:
    """Rows/s of the monitor's online encoding (numpy frame in, latents out, as in
    :class:`monitor.service.encoding.Encoders`) beside a bare ``x @ W_enc`` of the same shapes,
    interleaved round by round; the ratio is the median of the per-round ratios."""
    from monitor.service.encoding import Encoders
    from monitor.transcoders.model import Transcoder

    out: dict[str, Any] = {"rows_per_frame": rows, "threads": torch.get_num_threads(), "shapes": []}
    for d_in, d_sae in ENCODE_SHAPES:
        torch.manual_seed(0)
        model = Transcoder(d_in, d_sae, d_in).eval()
        enc = Encoders()
        enc.active["t"] = ({"source": "s", "run": "r"}, model)
        x = np.random.default_rng(0).standard_normal((rows, d_in)).astype(np.float32)
        xt, w = torch.from_numpy(x), model.W_enc.detach()
        ours, bare = [], []
        for _ in range(rounds):
            ours.append(_rows_per_s(lambda enc=enc, x=x: enc.encode("r", "s", x), rows, budget_s))
            with torch.no_grad():
                bare.append(_rows_per_s(lambda xt=xt, w=w: xt @ w, rows, budget_s))
        ratios = [a / b for a, b in zip(ours, bare, strict=True)]
        out["shapes"].append(
            {
                "d_in": d_in,
                "latents": d_sae,
                "encode_rows_per_s": statistics.median(ours),
                "matmul_rows_per_s": statistics.median(bare),
                "ratio": _ratios(ratios),
            }
        )
    return out


def _rows_per_s(fn: Any, rows: int, budget_s: float) -> float:
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if time.perf_counter() - t0 >= budget_s:
            return n * rows / (time.perf_counter() - t0)


def bench_alerts(
    *, alerts: int = 3000, every: int = 10, rate: float = 2000.0, flush_ms: tuple[float, ...] = (10.0, 100.0)
) -> dict[str, Any]:
    """Alert latency, agent step -> alert in Redis and -> at a webhook, with a live monitor.

    A small torch module is attached and stepped at ``rate`` forwards a second; every ``every``th
    forward carries a spike that a threshold rule fires on (and the next forward resolves), on
    channel k mod 64 for the k-th spike, so consecutive spikes are distinct alerts. The
    step's wall time is taken just before its forward; Redis's stream ID gives the time the alert was
    stored, a local HTTP server the time its POST arrived (one receiver grouping by rule and run, as
    by default, with ``group_wait: 0`` and ``group_interval: 0``: what arrived is sent at once). Run once per agent ``flush_ms`` (the agent batches rows for that long at
    most: the floor under the latency).
    """
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from torch import nn

    import agent_side
    from monitor.store import keys
    from monitor.store.embedded import EmbeddedRedis, free_port
    from monitor.store.records import Store, connect
    from monitor.tools.services import Services

    arrived: dict[int, float] = {}

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            now = time.time()
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            self.send_response(200)
            self.end_headers()
            for a in body.get("alerts") or ():  # Alertmanager's shape: every alert of the group in this POST
                if a.get("status") == "firing":
                    arrived.setdefault(int(a["annotations"]["step"]), now)

        def log_message(self, *args: Any) -> None:
            pass

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    width = 64
    model = nn.Sequential(nn.Linear(width, width))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(width))
        model[0].bias.zero_()
    calm = torch.zeros(1, width)
    spikes = torch.eye(width)[:, None, :] * 10.0
    out: dict[str, Any] = {"alerts": alerts, "every": every, "rate_steps_per_s": rate, "variants": []}
    try:
        with (
            tempfile.TemporaryDirectory(prefix="il-bench-") as tmp,
            EmbeddedRedis(Path(tmp), persist=False, write_url=False) as url,
        ):
            rules = Path(tmp) / "rules.yaml"
            hook_url = f"http://127.0.0.1:{hook.server_address[1]}/hook"
            rules.write_text(
                json.dumps(
                    {
                        "rules": [{"name": "spike", "kind": "threshold", "above": 5.0}],
                        "webhooks": [{"url": hook_url, "group_wait": 0, "group_interval": 0}],
                    }
                )
            )
            endpoint = f"tcp://127.0.0.1:{free_port()}"
            store = Store(connect(url))
            with Services(
                data_dir=Path(tmp),
                redis_url=url,
                endpoint=endpoint,
                log_dir=Path(tmp),
                explainer=False,
                extra_monitor_args=["--rules", str(rules), "--metrics-port", "-1", "--flush-ms", "50"],
            ):
                for fm in flush_ms:
                    run = f"bench-alerts-{fm:g}ms"
                    arrived.clear()
                    t_step: dict[int, float] = {}
                    n = alerts * every
                    with agent_side.attach(model, ["0:out"], run=run, endpoint=endpoint, flush_ms=fm) as tap:
                        if not tap.wait_for_monitor(10):
                            raise RuntimeError(f"the benchmark monitor at {endpoint} did not connect")
                        t0 = time.perf_counter()
                        with torch.no_grad():
                            for i in range(n):
                                due = t0 + i / rate
                                while (wait := due - time.perf_counter()) > 0:
                                    time.sleep(min(wait, 0.0005))
                                if i % every == 0:
                                    t_step[i] = time.time()
                                model(spikes[(i // every) % width] if i % every == 0 else calm)
                        held = n / (time.perf_counter() - t0)
                        tap.flush()
                    deadline = time.monotonic() + 30
                    stored: dict[int, float] = {}
                    while time.monotonic() < deadline and (len(stored) < alerts or len(arrived) < alerts):
                        stored = {}
                        for eid, f in store.r.xrange(keys.ALERTS):
                            a = json.loads(f[b"json"])
                            if a["run"] == run and a["state"] == "firing":
                                stored[int(a["step"])] = int(eid.split(b"-")[0]) / 1000.0
                        time.sleep(0.2)
                    to_redis = [1000 * (stored[s] - t) for s, t in t_step.items() if s in stored]
                    to_hook = [1000 * (arrived[s] - t) for s, t in t_step.items() if s in arrived]
                    out["variants"].append(
                        {
                            "agent_flush_ms": fm,
                            "steps_per_s_held": round(held, 1),
                            "alerts_planted": len(t_step),
                            "alerts_stored": len(to_redis),
                            "alerts_posted": len(to_hook),
                            "redis_ms": _percentiles(to_redis),
                            "webhook_ms": _percentiles(to_hook),
                        }
                    )
    finally:
        hook.shutdown()
        hook.server_close()
    return out


def _percentiles(ms: list[float]) -> dict[str, float | None]:
    if not ms:
        return {"p50": None, "p99": None, "max": None}
    a = np.asarray(ms)
    return {
        "p50": round(float(np.percentile(a, 50)), 2),
        "p99": round(float(np.percentile(a, 99)), 2),
        "max": round(float(a.max()), 2),
    }
