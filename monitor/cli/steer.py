"""`interlatent steer`: steer a running agent along a transcoder latent, live.

    interlatent steer --run R --tap T --latent J --alpha -1 [--transcoder NAME]   # add alpha * W_dec[J] at T
    interlatent steer --run R --tap T --latent J --op clamp --value 0             # or --op scale --alpha F, --op ablate
    interlatent steer --run R --clear [--id ID]                                   # take all (or one) off again
    interlatent steer --run R                                                     # what is asked for, what is active

The agent must have opted in (``attach(..., allow_control=True)``). The command writes the run's
wanted set to Redis, the monitor publishes it (:mod:`monitor.service.steering`), and the command waits
until the agent reports it applied (or refused, with its reason), unless ``--no-wait``.
Exit status: 0 done, 1 refused or not confirmed in time, 2 a usage or setup error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from monitor.cli.common import Settings
from monitor.service.steering import build_intervention, clear_interventions, describe_op, set_interventions, steer_effects
from monitor.store.records import ConfigError, Store

__all__ = ["add_parsers", "cmd_steer"]

OPS = ("add", "scale", "ablate", "clamp")  # agent_side.steer.OPS, without importing torch to build the parser


def _wait(store: Store, run: str, version: int, timeout_s: float) -> list[dict[str, Any]] | None:
    """The agent's events for ``version`` once it holds that version (or a later one); None on timeout."""
    deadline = time.monotonic() + timeout_s
    while store.steering(run)["applied_version"] < version:
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)
    return [e for e in store.steer_events(run, count=1000) if e.get("version") == version]


def _describe(e: dict[str, Any]) -> str:
    what = describe_op(e)
    line = f"{e['event']} {e.get('id', '')} ({what} at {e.get('tap', '?')}) from step {e.get('step', 0)}"
    return line + (f": {e['reason']}" if e.get("reason") else "")


def cmd_steer(args: argparse.Namespace, s: Settings) -> int:
    store = s.store_with_run(args.run)
    run = args.run
    state = store.steering(run)
    out: Callable[[str], None] = (lambda _line: None) if args.json else print
    if not args.clear and args.latent is None and args.tap is None and args.transcoder is None:
        effects = steer_effects(store, run)
        if args.json:
            print(json.dumps({"run": run, **state, "effects": effects}))
            return 0
        agent = {True: "accepts steering", False: "did not opt in", None: "has not said whether it accepts steering"}[
            state["control"]
        ]
        print(
            f"run {run}: agent {agent}; asked for (version {state['version']}): "
            + (", ".join(m["id"] for m in state["interventions"]) or "nothing")
            + f"; active (version {state['applied_version']}): {', '.join(state['active']) or 'nothing'}"
        )
        for ef in effects:
            b, d, diff = ef["before"], ef["during"], ef["difference"]
            span = f"steps {ef['applied_step']}-{ef['reverted_step'] if ef['reverted_step'] is not None else 'now'}"
            line = (
                f"  {ef['id']} ({ef['op']}, {span}): mean return {d['mean_return']} over {d['episodes']} episodes ended while on, "
                f"{b['mean_return']} over {b['episodes']} before"
            )
            if diff is not None and diff["ci"][0] is not None:
                line += f"; difference {diff['mean']:+.1f} [{diff['ci'][0]:+.1f}, {diff['ci'][1]:+.1f}]"
            print(line)
        return 0
    if args.clear:
        have = [m["id"] for m in state["interventions"]]
        if args.id and args.id not in have:
            raise ConfigError(f"run {run!r} has no steer {args.id!r}; it has: {', '.join(have) or 'none'}")
        version = clear_interventions(store.r, run, [args.id] if args.id else None)
        out(f"cleared {args.id or 'all steering'} of run {run} (version {version})")
        if not args.wait or state["control"] is not True:
            if args.json:
                print(json.dumps({"run": run, "version": version, "status": "cleared", "events": []}))
            return 0
        ivs: dict[str, Any] | None = None
    else:
        if state["control"] is not True:
            raise ConfigError(f"run {run}'s agent did not opt in: attach(..., allow_control=True)")
        ivs = build_intervention(
            store,
            args.run,
            latent=args.latent,
            op=args.op,
            tap=args.tap,
            transcoder=args.transcoder,
            alpha=args.alpha,
            value=args.value,
            steer_id_=args.id,
        )
        version = set_interventions(store.r, run, [ivs])
        out(f"asked run {run}'s agent to {ivs['op']} along {ivs['id']} at {ivs['tap']} (version {version})")
        if not args.wait:
            if args.json:
                print(json.dumps({"run": run, "version": version, "status": "asked", "id": ivs["id"], "events": []}))
            return 0
    events = _wait(store, run, version, args.timeout_s)
    if events is None:
        status = "timeout"
        print(
            f"interlatent: run {run}'s agent has not confirmed version {version} within {args.timeout_s:g}s; is it stepping, and is "
            "the monitor running (`interlatent status`)? It applies the change when it next steps; `--clear` takes it back",
            file=sys.stderr,
        )
    else:
        for e in events:
            out(_describe(e))
        mine = [e for e in events if ivs is not None and e.get("id") == ivs["id"]]
        refused = [e for e in mine if e["event"] == "refused"]
        if refused:
            status = "refused"
            clear_interventions(store.r, run, [ivs["id"]])  # not left asking for what the agent cannot do
            print(f"interlatent: run {run}'s agent refused {ivs['id']}: {refused[-1].get('reason', '')}", file=sys.stderr)
        elif ivs is not None and not mine:
            status = "applied" if ivs["id"] in store.steering(run)["active"] else "superseded"
            out(f"{ivs['id']} is {'active' if status == 'applied' else 'not active: a later change replaced it'}")
        else:
            status = "applied" if ivs is not None else "cleared"
            if ivs is None and not events:
                out("nothing was active")
    if args.json:
        print(json.dumps({"run": run, "version": version, "status": status, "events": events or []}))
    return 0 if status in ("applied", "cleared") else 1


def add_parsers(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    sp = sub.add_parser("steer", help="steer a running agent along a transcoder latent, live (the agent must opt in)")
    common(sp)
    sp.add_argument("--run", required=True)
    sp.add_argument(
        "--tap", help="where to steer: a tap that one of the run's transcoders writes (default: --transcoder's target)"
    )
    sp.add_argument("--latent", type=int, help="the latent whose decoder direction to use")
    sp.add_argument(
        "--transcoder", help="a name from `interlatent transcoders` (default: the run's one transcoder that writes --tap)"
    )
    sp.add_argument(
        "--op",
        choices=OPS,
        default="add",
        help="add alpha*direction, scale its component by alpha, ablate it, or clamp the latent",
    )
    sp.add_argument("--alpha", type=float, help="add: the multiple of the direction; scale: the factor")
    sp.add_argument("--value", type=float, help="clamp: the value to hold the latent at")
    sp.add_argument("--id", help="the steer's id (default latents:TRANSCODER/LATENT); with --clear, the one steer to take off")
    sp.add_argument("--clear", action="store_true", help="take the run's steering off (all of it, or --id)")
    sp.add_argument("--no-wait", dest="wait", action="store_false", help="return once asked, without waiting for the agent")
    sp.add_argument("--timeout-s", type=float, default=10.0, help="how long to wait for the agent to confirm")
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp.set_defaults(fn=cmd_steer)
