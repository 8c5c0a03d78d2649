"""`interlatent bench`: overheads measured side by side, printed as a table and one JSON line."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from monitor.cli.common import Settings, pin_threads
from monitor.store.records import ConfigError

__all__ = ["add_parsers", "cmd_bench"]


def cmd_bench(args: argparse.Namespace, s: Settings) -> int:
    from monitor.tools import bench

    pin_threads(args.threads)
    if args.what == "hook":
        res = {"hook": bench.bench_hook(rounds=args.rounds, steps=args.steps), "ingest": bench.bench_ingest()}
        if not args.json:
            _print_hook_table(res)
    elif args.what == "alerts":
        res = {"alerts": bench.bench_alerts(alerts=args.alerts)}
        if not args.json:
            _print_alerts_table(res["alerts"])
    elif args.what == "scale":
        from monitor.tools.scale import bench_scale

        if args.agents < 1 or not args.seconds > 0 or not args.rate_hz > 0:
            raise ConfigError("--agents must be at least 1, --seconds and --rate-hz positive")
        res = {"scale": bench_scale(agents=args.agents, seconds=args.seconds, rate_hz=args.rate_hz)}
        if not args.json:
            _print_scale_table(res["scale"])
    elif args.what == "encode":
        res = {"encode": bench.bench_encode()}
        if not args.json:
            _print_encode_table(res["encode"])
    else:
        res = {"stats": bench.bench_stats()}
        if not args.json:
            _print_stats_table(res["stats"])
    print(json.dumps(res))
    return 0


def _print_scale_table(sc: dict[str, Any]) -> None:
    print(
        f"bench scale: {sc['agents']} agents, each {sc['rate_hz']:g} forwards/s of {sc['rows_per_forward']} rows "
        f"({sc['width']} wide) for {sc['seconds']:g} s, on {sc['cores']} cores"
    )
    print(
        "  masters monitors  offered/s  received/s  recv  runs/monitor   rows/monitor-CPU-s  Redis cmd/s  cmd/run/s  cmd/Redis-CPU-s"
    )
    for c in sc["configs"]:
        print(
            f"  {c['redis_masters']:>7} {c['monitors']:>8} {c['offered_rows_per_s']:>10,.0f} {c['received_rows_per_s']:>11,.0f} "
            f"{c['received_vs_offered']:>5.2f}  {str(c['runs_per_monitor']):<14} {c['rows_per_monitor_cpu_s']:>17,.0f} "
            f"{c['redis_commands_per_s']:>12,.0f} {c['redis_commands_per_run_s']:>10.1f} {c['redis_commands_per_cpu_s']:>16,.0f}"
        )


def _print_alerts_table(al: dict[str, Any]) -> None:
    print(
        f"alert latency, agent step -> alert, live monitor: {al['alerts']} planted spikes, one every {al['every']} steps "
        f"at {al['rate_steps_per_s']:.0f} steps/s"
    )
    print(
        f"  {'agent flush':>12}{'steps/s held':>14}{'stored':>8}{'posted':>8}{'Redis p50 / p99 ms':>22}{'webhook p50 / p99 ms':>24}"
    )
    for v in al["variants"]:
        r, h = v["redis_ms"], v["webhook_ms"]
        print(
            f"  {v['agent_flush_ms']:>9.0f} ms{v['steps_per_s_held']:>14,.0f}{v['alerts_stored']:>8}{v['alerts_posted']:>8}"
            f"{r['p50']:>12} / {r['p99']:<8}{h['p50']:>14} / {h['p99']}"
        )


def _print_encode_table(enc: dict[str, Any]) -> None:
    print(
        f"online encoding vs a bare matmul of the same shapes, frames of {enc['rows_per_frame']} rows, torch threads {enc['threads']}"
    )
    print(f"  {'d_in':>6}{'latents':>9}{'encode rows/s':>16}{'matmul rows/s':>16}{'ratio (median [min, max])':>30}")
    for r in enc["shapes"]:
        q = r["ratio"]
        print(
            f"  {r['d_in']:>6}{r['latents']:>9}{r['encode_rows_per_s']:>16,.0f}{r['matmul_rows_per_s']:>16,.0f}"
            f"{q['median']:>12.3f} [{q['min']:.3f}, {q['max']:.3f}]"
        )


def _print_stats_table(st: dict[str, Any]) -> None:
    print(f"live statistics vs {st['metrics']} metrics, window {st['window_steps']} steps, one thread")
    print(f"  {'latents':>8}{'rolling Pearson':>18}{'all analytics':>22}{'river, one object a pair':>28}{'speedup':>10}")
    for r in st["rows"]:
        river = f"{r['river_us_per_step']:,.0f} us" + ("" if r["river_measured"] else " (extrap.)")
        print(
            f"  {r['latents']:>8}{r['rolling_pearson_us_per_step']:>15,.1f} us{r['all_analytics_us_per_row_in_frames']:>15,.1f} us/row"
            f"{river:>28}{r['speedup_vs_river']:>9,.0f}x"
        )
    print(
        f"  (all analytics: rolling + EW correlations, top-k, in frames of {st['frame_rows']} rows; "
        f"river measured at {st['river_us_per_pair_update']:.2f} us per pair update)"
    )


def _print_hook_table(res: dict[str, Any]) -> None:
    h, i = res["hook"], res["ingest"]
    sps = h["steps_per_s"]
    print(
        f"SB3 PPO CartPole predict+step, {h['rounds']} interleaved rounds of {h['steps_per_round']} steps, "
        f"torch threads {h['threads']}, taps {', '.join(h['taps'])}"
    )
    print(f"  {'variant':<24}{'steps/s':>10}{'ratio (median [min, max])':>30}{'added us/step':>15}")
    print(f"  {'plain':<24}{sps['plain']:>10.0f}{'1.000':>12}{'':>18}{'0':>15}")
    us = h["overhead_us_per_step"]
    for name, key, var in (
        ("attached, no monitor", "ratio_no_monitor", "attached_no_monitor"),
        ("attached, bare sink", "ratio_sink", "attached_sink"),
        ("attached, live monitor", "ratio_monitor", "attached_monitor"),
    ):
        r = h[key]
        print(f"  {name:<24}{sps[var]:>10.0f}{r['median']:>12.3f} [{r['min']:.3f}, {r['max']:.3f}]{us[var]:>15.1f}")
    print(f"monitor ingest, {i['width']}-wide {i['dtype']} rows, {i['rows_per_frame']} rows/frame:")
    print(f"  bare decode        {i['decode_rows_per_s']:>12,.0f} rows/s")
    print(f"  monitor in-process {i['monitor_rows_per_s']:>12,.0f} rows/s ({i['monitor_vs_decode']:.2f} of decode)")
    print(f"  over a socket      {i['socket_rows_per_s']:>12,.0f} rows/s")


def add_parsers(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    sp = sub.add_parser("bench", help="measure overheads side by side")
    common(sp)
    sp.add_argument(
        "what",
        choices=["hook", "stats", "encode", "alerts", "scale"],
        help="hook: agent overhead and monitor ingest; stats: live statistics per step; encode: online encoding vs a bare matmul; "
        "alerts: alert latency to Redis and to a webhook; scale: agents against 1-3 monitors on 1 and 3 Redis masters",
    )
    sp.add_argument("--json", action="store_true", help="print only the JSON line")
    sp.add_argument("--rounds", type=int, default=9)
    sp.add_argument("--alerts", type=int, default=3000, help="alerts: spikes planted per variant")
    sp.add_argument("--steps", type=int, default=3000)
    sp.add_argument("--agents", type=int, default=12, help="scale: agent processes")
    sp.add_argument("--seconds", type=float, default=8.0, help="scale: how long each configuration runs")
    sp.add_argument("--rate-hz", type=float, default=100.0, help="scale: forwards per second per agent (32 rows each)")
    sp.add_argument("--threads", type=int, default=1, help="torch threads for the agent loop (stated in the output)")
    sp.set_defaults(fn=cmd_bench)
