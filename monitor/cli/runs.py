"""What a run costs and how long it stays: `interlatent status` (text), `interlatent record`,
`interlatent runs [delete R]`, and the monitor's limits (outbox, retention, steering off).

Names in text output are escaped (:func:`printable`): a run, tap or metric name that Redis holds
is shown with its control characters as ``\\x..`` escapes, so it can neither forge a line of
output nor send a terminal an escape sequence. ``--json`` prints what Redis holds, JSON-escaped.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monitor.cli.common import Settings
from monitor.cli.keys import add_parsers as add_keys_parsers
from monitor.store.records import ConfigError, Store

__all__ = [
    "add_parsers",
    "add_monitor_flags",
    "monitor_limits",
    "print_status",
    "printable",
    "cmd_record",
    "cmd_runs",
    "RETAIN_DAYS",
    "RECORD_TIMEOUT_S",
]

RETAIN_DAYS = 30.0  # an ended run's keys are deleted this long after its last frame
RECORD_TIMEOUT_S = 3600.0  # `record` gives up after this long
MONITOR_GONE_S = 15.0  # a recording whose monitor has had no health key this long is orphaned


def printable(text: Any) -> str:
    """``text`` with every character that is not printable (control, format, line and paragraph
    separators, NUL) written as a Python escape: safe to print on a terminal line."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)


def add_monitor_flags(sp: argparse.ArgumentParser) -> None:
    """The flags of `interlatent monitor` that bound what it holds and keeps."""
    sp.add_argument("--no-steering", action="store_true", help="bind no control channel (no live steering)")
    sp.add_argument(
        "--outbox-mib",
        type=float,
        default=64.0,
        help="memory for episodes and tokens not yet in Redis while it is away; past it they are dropped and counted",
    )
    sp.add_argument(
        "--retain-days",
        type=float,
        default=RETAIN_DAYS,
        help=f"delete a run's keys this many days after its last frame (default {RETAIN_DAYS:g}; 0: keep forever)",
    )
    sp.add_argument(
        "--allow-keys",
        metavar="DIR",
        help="remote agents: CURVE on the data channel too, only for agents whose public key (NAME.key) is in DIR",
    )


def monitor_limits(args: argparse.Namespace) -> dict[str, Any]:
    """The Monitor keywords the flags of :func:`add_monitor_flags` give, or a :class:`ConfigError`."""
    if not args.outbox_mib > 0:
        raise ConfigError(f"--outbox-mib must be > 0, got {args.outbox_mib:g}")
    if not args.retain_days >= 0:
        raise ConfigError(f"--retain-days must be >= 0 (0: keep forever), got {args.retain_days:g}")
    return {
        "outbox_bytes": int(args.outbox_mib * (1 << 20)),
        "retain_days": args.retain_days or None,
        "allow_keys": Path(args.allow_keys) if args.allow_keys else None,
    }


def _served_by(ident: str, where: dict[str, str]) -> str:
    if ident in where:
        return f"; served by {printable(where[ident])} ({printable(ident)})"
    return f"; last written by {printable(ident)}, no longer running"


def print_status(st: dict[str, Any]) -> None:
    """The text of `interlatent status`: every name escaped."""
    mon = st["monitor"]
    n = len(mon.get("instances", []))
    where = {i.get("id"): i.get("endpoint", "?") for i in mon.get("instances", [])}
    line = f"monitor: {'alive' if mon['alive'] else 'not running'}" + (f" ({n} instances)" if n > 1 else "")
    if mon["rejected"]:
        line += f"; rejected {printable(mon['rejected'])}"
    if any(mon.get("lost", {}).values()):
        line += f"; lost while Redis was away {printable(mon['lost'])}"
    print(line)
    if st["alerts"]["firing"] or st["alerts"]["pending"]:
        print(f"alerts: {st['alerts']['firing']} firing, {st['alerts']['pending']} pending (`interlatent alerts`)")
    if not st["runs"]:
        print("no runs yet: attach an agent with agent_side.attach(...)")
    for r in st["runs"]:
        lost = {k: v for k, v in r.get("lost", {}).items() if v}
        print(
            f"run {printable(r['run'])}: steps {r['steps']}, unwatched {r.get('unwatched', 0)}, drops {r['drops']}, "
            f"gaps {r['gaps']}, episodes {r['episodes']} (mean return {r['return_mean_100']:.1f}), "
            f"last seen {r['last_seen_s']:.1f}s ago"
            + (f"; lost {lost}" if lost else "")
            + (f"; {r['early_dropped']} rows before metrics let go" if r.get("early_dropped") else "")
            + (_served_by(r.get("monitor", ""), where) if n > 1 and r.get("monitor") else "")
        )
        for tap, t in r["taps"].items():
            print(f"  {printable(tap):<40} width {t['width']:>6}  rows {t['rows']:>10}")
        if r["metrics"]:
            print(f"  metrics: {', '.join(printable(m) for m in r['metrics'])}")


# -- record ---------------------------------------------------------------------------------------
def _monitors(store: Store) -> set[str]:
    return {h.get("id", "") for h in store.health() if h.get("kind") == "monitor"}


def cmd_record(args: argparse.Namespace, s: Settings) -> int:
    """Ask a monitor to record; with --wait (the default) follow it until done, failed, the
    deadline, or its monitor is gone (no health key for MONITOR_GONE_S)."""
    from tqdm import tqdm

    if args.steps < 1 or not args.timeout_s > 0:
        raise ConfigError("--steps must be at least 1 and --timeout-s > 0")
    store = s.store()
    deadline = time.monotonic() + 10
    while not _monitors(store):
        if time.monotonic() > deadline:
            raise ConfigError("no monitor is running to record: start one with `interlatent up`")
        time.sleep(0.2)
    store.set_record(args.run, {"steps": args.steps, "state": "requested", "time": time.time()})
    print(
        f"asked the monitor to record {args.steps} steps of run {printable(args.run)!r}"
        + ("" if args.wait else "; it records in the background")
    )
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout_s
    gone_since: float | None = None
    with tqdm(total=args.steps, unit="step", disable=None) as bar:
        while True:
            st = store.record_requests().get(args.run, {})
            bar.n = int(st.get("recorded", 0))
            bar.refresh()
            if st.get("state") in ("done", "failed"):
                break
            now = time.monotonic()
            by = st.get("monitor")
            alive = _monitors(store)
            if (by not in alive) if by else not alive:
                gone_since = gone_since or now
                if now - gone_since > MONITOR_GONE_S:
                    who = f"the monitor recording it ({by})" if by else "no monitor"
                    raise ConfigError(
                        f"recording of run {printable(args.run)!r} stopped: {who} has had no health key for "
                        f"{MONITOR_GONE_S:g}s (it died?); a monitor that starts fails or resumes the request"
                    )
            else:
                gone_since = None
            if now > deadline:
                raise ConfigError(
                    f"recording of run {printable(args.run)!r} not done after {args.timeout_s:g}s "
                    f"({bar.n} of {args.steps} steps): is the agent stepping? It goes on in the background"
                )
            time.sleep(0.5)
    if st["state"] == "failed":
        raise ConfigError(f"recording failed: {printable(st.get('error'))}")
    print(f"recorded {st['recorded']} steps into {st['path']}")
    return 0


# -- runs -----------------------------------------------------------------------------------------
def cmd_runs(args: argparse.Namespace, s: Settings) -> int:
    store = s.store()
    if args.runs_cmd == "delete":
        if args.run not in store.runs():
            raise ConfigError(f"no run {printable(args.run)!r}; runs: {', '.join(map(printable, store.runs())) or '(none yet)'}")
        seen = store.last_seen(args.run)
        if seen is not None and time.time() - seen < args.quiet_s and not args.force:
            raise ConfigError(
                f"run {printable(args.run)!r} sent a frame {time.time() - seen:.0f}s ago: a monitor holding it would write it "
                "again; stop its agent first, or pass --force"
            )
        n = store.delete_run(args.run)
        if args.json:
            print(json.dumps({"run": args.run, "deleted_keys": n}))
        else:
            print(f"deleted run {printable(args.run)}: {n} keys")
        return 0
    out = [{"run": r, **store.run_cost(r)} for r in store.runs()]
    if args.json:
        print(json.dumps({"runs": out}))
        return 0
    if not out:
        print("no runs yet: attach an agent with agent_side.attach(...)")
    for r in out:
        age = time.time() - r["last_seen"] if r["last_seen"] else float("nan")
        print(
            f"{printable(r['run']):<40} {r['keys']:>4} keys {r['bytes'] / 1024:>10.1f} KiB  last seen {age / 86400:.1f} days ago"
        )
    return 0


def add_parsers(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    sp = sub.add_parser("runs", help="every run with the Redis keys and memory it holds; `runs delete R` removes one")
    common(sp)
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp.set_defaults(fn=cmd_runs, runs_cmd="list")
    runs_sub = sp.add_subparsers(dest="runs_cmd")
    dp = runs_sub.add_parser("delete", help="delete every key of one run (its state, stats, episodes, tokens, steering)")
    # given here or before `delete`: SUPPRESS keeps this parser's default from hiding the outer value
    dp.add_argument("--redis", default=argparse.SUPPRESS, help="Redis URL (as for every command)")
    dp.add_argument("--data-dir", default=argparse.SUPPRESS, help="the data directory (as for every command)")
    dp.add_argument("run")
    dp.add_argument("--force", action="store_true", help="delete it even if it is still streaming")
    dp.add_argument("--quiet-s", type=float, default=60.0, help="a run that sent a frame this recently counts as streaming")
    dp.add_argument("--json", action="store_true", help="print one JSON document")
    dp.set_defaults(fn=cmd_runs)
    add_keys_parsers(sub, common)
