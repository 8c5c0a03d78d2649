"""`interlatent alerts` and `evaluate-alerts`."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from monitor.cli.common import Settings, sigterm_as_interrupt

__all__ = [
    "cmd_alerts",
    "cmd_evaluate_alerts",
    "cmd_rules_check",
    "cmd_rules_test",
    "cmd_explainer",
    "cmd_explain",
    "cmd_explanations",
]


def cmd_alerts(args: argparse.Namespace, s: Settings) -> int:
    from monitor.store import keys

    r = s.store().r

    def wanted(a: dict) -> bool:
        return args.run is None or a["run"] == args.run

    def show(a: dict) -> None:
        print(json.dumps(a) if args.json else f"{time.strftime('%H:%M:%S', time.localtime(a['time']))} {a['text']}", flush=True)

    past = s.store().last_alerts(args.run, args.last) if args.last > 0 else []
    if args.follow and args.max is not None:
        past = past[len(past) - min(len(past), args.max) :]  # --max counts what is shown, past ones included
    if not args.follow:
        if args.json:
            active = [json.loads(v) for v in r.hvals(keys.ALERTS_ACTIVE)]
            print(json.dumps({"alerts": [a for _, a in past], "active": [a for a in active if wanted(a)]}))
        elif not past:
            print(
                "no alerts yet" + (f" for run {args.run!r}" if args.run else "") + "; the monitor raises them with --rules FILE"
            )
        else:
            for _, a in past:
                show(a)
        return 0
    newest = r.xrevrange(keys.ALERTS, count=1)
    last = newest[0][0] if newest else b"0-0"  # follow from the stream's end, whatever run the past came from
    for _, a in past:
        show(a)
    shown = len(past)
    while args.max is None or shown < args.max:
        for _, entries in r.xread({keys.ALERTS: last}, block=1000) or []:
            for eid, f in entries:
                last = eid
                a = json.loads(f[b"json"])
                if wanted(a) and (args.max is None or shown < args.max):
                    show(a)
                    shown += 1
    return 0


def _rules(path: str) -> Any:
    from monitor.alerts.rules import RulesError, load_rules
    from monitor.store.records import ConfigError

    try:
        return load_rules(path)
    except RulesError as e:
        raise ConfigError(f"{path}: {e}") from e


def cmd_rules_check(args: argparse.Namespace, s: Settings) -> int:
    """Validate a rules file, every field and webhook, as the monitor would (``promtool check rules``)."""
    rules = _rules(args.file)
    kinds = ", ".join(sorted({r.kind for r in rules.rules}))
    hooks = ", ".join(w.name for w in rules.webhooks) or "none"
    print(f"{args.file}: {len(rules.rules)} rules ({kinds}), webhooks: {hooks}: ok")
    return 0


def cmd_rules_test(args: argparse.Namespace, s: Settings) -> int:
    """Replay a recording through a rules file and print what would have fired (``promtool test rules``)."""
    from monitor.stats.analytics import AnalyticsConfig
    from monitor.store.recording import Recording, RecordingError
    from monitor.store.records import ConfigError
    from monitor.tools.replay import replay_rules

    rules = _rules(args.file)
    try:
        rec = Recording(args.recording)
        run = args.run or rec.manifest.get("run") or "recording"
        events = replay_rules(rules, rec, run=run, analytics=AnalyticsConfig(window_steps=args.window_steps), chunk=args.chunk)
    except RecordingError as e:
        raise ConfigError(str(e)) from e
    shown = [e for e in events if args.all_states or e["state"] in ("firing", "resolved")]
    if args.json:
        print(json.dumps({"run": run, "recording": str(rec.dir), "events": shown, "counts": _counts(events)}))
        return 0
    for e in shown:
        print(e["text"])
    fired = _counts(events)
    summary = ", ".join(f"{rule}: {c.get('firing', 0)} fired" for rule, c in fired.items()) or "nothing"
    print(f"{len(shown)} events over {rec.dir} as run {run!r}; {summary}")
    return 0


def _counts(events: list[dict]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for e in events:
        c = out.setdefault(e["rule"], {})
        c[e["state"]] = c.get(e["state"], 0) + 1
    return out


def cmd_evaluate_alerts(args: argparse.Namespace, s: Settings) -> int:
    from monitor.stats.early import evaluate_alerts

    store = s.store_with_run(args.run)
    res = evaluate_alerts(store.alerts(args.run), store.episodes(args.run), k=args.k)
    res["run"] = args.run
    res["suggested_rules"] = store.suggestions(args.run)
    if args.json:
        print(json.dumps(res))
        return 0
    print(
        f"run {args.run}: {res['episodes']} episodes, {res['failures']} failures; an alert counts if a failure follows within {args.k} steps"
    )
    if not res["rules"]:
        print("  no alerts fired for this run (start the monitor with --rules FILE)")
    for rule, r in res["rules"].items():
        print(
            f"  {rule:<32} alerts {r['alerts']:>5}  precision {r['precision']}  recall {r['recall']}  median lead {r['median_lead_steps']} steps"
        )
    for sug in res["suggested_rules"]:
        print(
            f"  suggested: {json.dumps(sug['rule'])}  (moves {sug['direction']} its mean {sug['mean']} by {sug['score_std']} std"
            f" on average before failures, in {sug['moved_in']:.0%} of {sug['failures']})"
        )
    return 0


def cmd_explainer(args: argparse.Namespace, s: Settings) -> int:
    from explainer import Worker, WorkerSettings

    w = Worker(s.store(), settings=WorkerSettings.from_args(args))
    if args.burst:
        n = w.run(burst=True)
        print(f"explained {n} latents ({w.failed} failed)")
        return 0
    sigterm_as_interrupt()
    try:
        w.run()
    except KeyboardInterrupt:
        pass
    return 0


def cmd_explain(args: argparse.Namespace, s: Settings) -> int:
    from explainer import file_job
    from monitor.store.records import ConfigError

    store = s.store_with_run(args.run)
    tap, sep, index = args.latent.rpartition("/")
    if not sep or not index.isdigit():
        raise ConfigError(
            f"--latent takes TAP/INDEX, like latents:NAME/2 or mlp_extractor.policy_net.1:out/5; got {args.latent!r}"
        )
    if tap not in store.taps(args.run):
        raise ConfigError(f"run {args.run!r} has no tap {tap!r}; it has {', '.join(store.taps(args.run))}")
    filed = file_job(store.r, args.run, tap, int(index), reason="asked")
    print(f"filed an explain job for {args.run} {tap} #{index}" if filed else "a job for that latent is already waiting")
    return 0


def cmd_explanations(args: argparse.Namespace, s: Settings) -> int:
    from explainer import explanations

    out = explanations(s.store().r, args.run)
    if args.json:
        print(json.dumps({"run": args.run, "explanations": out}))
        return 0
    if not out:
        print(
            f"no explanations for run {args.run!r} yet: `interlatent explain --run {args.run} --latent TAP/INDEX`, with a worker running"
        )
    for e in out:
        sc = e.get("score") or {}
        print(
            f"{e['tap']} #{e['latent']}: {e.get('label') or e.get('error')}  "
            f"(detection {sc.get('balanced_accuracy')}, simulation {sc.get('simulation')}, {e['backend']})"
        )
    return 0
