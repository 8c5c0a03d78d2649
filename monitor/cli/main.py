"""The ``interlatent`` command. Settings come from flags or the environment here, and only here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from agent_side.wire import DEFAULT_ENDPOINT
from explainer.backends import BackendError
from monitor.alerts.prom import DEFAULT_PORT as METRICS_PORT
from monitor.cli.alerts import (
    cmd_alerts,
    cmd_evaluate_alerts,
    cmd_explain,
    cmd_explainer,
    cmd_explanations,
    cmd_rules_check,
    cmd_rules_test,
)
from monitor.cli.bench import add_parsers as add_bench_parsers
from monitor.cli.common import Settings, pin_threads, sigterm_as_interrupt
from monitor.cli.experiments import add_parsers as add_experiment_parsers
from monitor.cli.live import PANEL_PORT
from monitor.cli.live import add_parsers as add_live_parsers
from monitor.cli.runs import add_monitor_flags, cmd_record, monitor_limits, print_status
from monitor.cli.runs import add_parsers as add_runs_parsers
from monitor.cli.steer import add_parsers as add_steer_parsers
from monitor.cli.train import cmd_import, cmd_inspect, cmd_judge, cmd_report, cmd_train, cmd_transcoders
from monitor.experiments.agents import TRAIN_STEPS
from monitor.service.leases import LEASE_S, lease_problem
from monitor.store.records import ConfigError

log = logging.getLogger("interlatent")


# -- commands -------------------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace, s: Settings) -> int:
    from monitor.tools.services import Services

    sigterm_as_interrupt()
    extra = ["--rules", str(Path(args.rules).resolve())] if args.rules else []
    extra += ["--metrics-port", str(args.metrics_port)]
    if args.rules:
        from monitor.alerts.rules import RulesError, load_rules

        try:
            load_rules(args.rules)  # fail here, in one line, not in a child's log
        except RulesError as e:
            print(f"interlatent: {e}", file=sys.stderr)
            return 2
    services = Services(
        data_dir=s.data_dir,
        redis_url=s.redis_url,
        endpoint=s.endpoint,
        extra_monitor_args=extra,
        panel_port=None if args.no_panel else args.panel_port,
    )
    try:
        services.start()
        metrics = f", /metrics on http://127.0.0.1:{args.metrics_port}/metrics" if args.metrics_port > 0 else ""
        print(f"interlatent up: redis {services.redis_url}, monitor on {s.endpoint}{metrics}")
        if services.panel_url:
            print(f"panel: {services.panel_url}")
        print("attach an agent with agent_side.attach(...); `interlatent status` shows what streams; Ctrl-C stops")
        return services.wait()
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:  # a service that did not come up: its log says why
        print(f"interlatent: {e}", file=sys.stderr)
        return 2
    finally:
        services.stop()


def _lease_s(v: float, flush_ms: float) -> float:
    why = lease_problem(v, flush_ms / 1000.0)
    if why is not None:
        raise ConfigError(f"--lease-s {why}")
    return v


def cmd_monitor(args: argparse.Namespace, s: Settings) -> int:
    from monitor.alerts.prom import MetricsPortError, serve_metrics
    from monitor.alerts.rules import RulesError, load_rules
    from monitor.service.ingest import Monitor
    from monitor.stats.analytics import AnalyticsConfig

    try:
        rules = load_rules(args.rules) if args.rules else None
    except RulesError as e:
        print(f"interlatent: {e}", file=sys.stderr)
        return 2
    pin_threads(1)
    cfg = None if args.no_analytics else AnalyticsConfig(window_steps=args.window_steps, ew_alpha=args.ew_alpha, top_k=args.top_k)
    lease_s = _lease_s(args.lease_s, args.flush_ms)  # before Redis: a bad flag is named whether or not Redis is there
    store = s.store()
    auto = None
    if args.auto_train:
        from monitor.service.autotrain import AutoTrain, parse_pairs
        from monitor.store.records import resolve_redis_url

        try:
            pairs = tuple(parse_pairs(args.auto_train))
        except ValueError as e:
            raise ConfigError(str(e)) from e
        auto = AutoTrain(
            pairs=pairs,
            redis_url=resolve_redis_url(s.redis_url, s.data_dir),
            data_dir=s.data_dir,
            steps=args.auto_train_steps,
            latents=args.auto_train_latents,
            epochs=args.auto_train_epochs,
        )
    mon = Monitor(
        store,
        endpoint=s.endpoint,
        flush_ms=args.flush_ms,
        analytics=cfg,
        rules=rules,
        data_dir=s.data_dir,
        auto_train=auto,
        control_endpoint=args.control_endpoint,
        steering=not args.no_steering,
        evict_idle_s=args.evict_idle_s if args.evict_idle_s > 0 else None,
        alert_idle_s=args.alert_idle_s if args.alert_idle_s > 0 else None,
        lease_s=lease_s,
        **monitor_limits(args),
    )
    server = None
    if args.metrics_port >= 0:
        try:
            server = serve_metrics(mon, args.metrics_port)
        except MetricsPortError as e:
            print(f"interlatent: {e} (--metrics-port P for another port, 0 for any free one, -1 for none)", file=sys.stderr)
            mon.close()
            return 2
    signal.signal(signal.SIGTERM, lambda *_: mon.stop())
    signal.signal(signal.SIGINT, lambda *_: mon.stop())
    try:
        res = mon.run(max_frames=args.max_frames, idle_exit_s=args.idle_exit_s)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        mon.close()
    log.info("monitor done: %d frames, %d rows, rejected %s", res.frames, res.rows, res.rejected)
    return 0


def cmd_status(args: argparse.Namespace, s: Settings) -> int:
    st = s.store().status()
    if args.json:
        print(json.dumps(st))
        return 0
    print_status(st)
    return 0


def cmd_stats(args: argparse.Namespace, s: Settings) -> int:
    from monitor.store.tapstats import tap_stats

    store = s.store_with_run(args.run)
    taps = [args.tap] if args.tap else sorted(store.taps(args.run))
    out = {"run": args.run, "taps": {t: tap_stats(store, args.run, t, top=args.top) for t in taps}}
    if args.json:
        print(json.dumps(out))
        return 0
    for tap, d in out["taps"].items():
        if d is None:
            print(f"{tap}: no such tap in run {args.run!r}")
            continue
        unit = "latent" if tap.startswith("latents:") else "channel"
        print(
            f"{tap}: {d['width']} {unit}s, {d['rows']} rows; rolling window {d.get('window_steps', '-')} steps "
            f"({d.get('window_n', 0)} rows), {d.get('paired', 0)} rows paired with metrics"
        )
        if not d.get("metrics"):
            print("  no step metrics yet: wrap the env with tap.wrap(env) to correlate channels with metrics")
        for c in d["channels"][: args.show]:
            best = max(((m, r) for m, r in c["corr"].items() if r is not None), key=lambda mr: abs(mr[1]), default=None)
            w = c.get("window", {})
            print(
                f"  {unit} {c['channel']:>5}  mean {c['mean']:+.3f} std {c['std']:.3f} active {w.get('frac_active', float('nan')):.2f}"
                + (f"  strongest r({best[0]}) = {best[1]:+.2f}" if best else "")
            )
    return 0


def cmd_demo(args: argparse.Namespace, s: Settings) -> int:
    from monitor.tools.demo import DEMO_RULES, DemoConfig, Pushes, run_demo

    pin_threads(1)
    sigterm_as_interrupt()
    for flag, v in (("--steps", args.steps), ("--warmup-steps", args.warmup_steps), ("--train-steps", args.train_steps)):
        if v is not None and v < 1:
            raise ConfigError(f"{flag} must be at least 1, got {v}")
    if args.rate < 0 or not 0 <= args.push_prob <= 1:
        raise ConfigError("--rate must be >= 0 (0: as fast as it goes) and --push-prob in [0, 1]")
    cfg = DemoConfig(
        headless=args.headless,
        steps=args.steps,
        train_steps=args.train_steps,
        warmup_steps=args.warmup_steps,
        rate=args.rate,
        pushes=Pushes(prob=args.push_prob),
        steer=not args.no_steer,
        rules=Path(args.rules) if args.rules else DEMO_RULES,
        panel_port=args.panel_port,
    )
    return run_demo(cfg, data_dir=s.data_dir, redis_url=s.redis_url, endpoint=s.endpoint, out=print)


# -- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="interlatent", description="Watch the minds of running agents.")
    p.add_argument("--log-level", default=os.environ.get("INTERLATENT_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser, endpoint: bool = False) -> None:
        sp.add_argument("--redis", help="Redis URL (default $INTERLATENT_REDIS_URL, else the embedded one of `interlatent up`)")
        sp.add_argument(
            "--data-dir", help="where the embedded Redis and caches live (default $INTERLATENT_DATA_DIR or ~/.interlatent)"
        )
        if endpoint:
            sp.add_argument(
                "--endpoint", help=f"ZeroMQ endpoint the monitor binds (default $INTERLATENT_ENDPOINT or {DEFAULT_ENDPOINT})"
            )

    sp = sub.add_parser("up", help="start Redis (embedded unless --redis) and the monitor; Ctrl-C stops all")
    common(sp, endpoint=True)
    sp.add_argument("--rules", help="YAML alert rules for the monitor")
    sp.add_argument("--panel-port", type=int, default=PANEL_PORT, help="port of the live panel (a free one if taken)")
    sp.add_argument("--no-panel", action="store_true", help="do not start the panel")
    sp.add_argument(
        "--metrics-port",
        type=int,
        default=METRICS_PORT,
        help="the monitor's Prometheus /metrics on loopback (0: any free, -1: off)",
    )
    sp.set_defaults(fn=cmd_up)

    sp = sub.add_parser("monitor", help="run the monitor's receive loop")
    common(sp, endpoint=True)
    sp.add_argument("--flush-ms", type=float, default=200.0, help="how often state is written to Redis")
    sp.add_argument("--max-frames", type=int, help="exit after this many frames (stop-when-done mode)")
    sp.add_argument("--idle-exit-s", type=float, help="exit after this many seconds without a frame")
    sp.add_argument(
        "--evict-idle-s",
        type=float,
        default=900.0,
        help="let a run quiet this long go from memory (its state stays in Redis; 0: never)",
    )
    sp.add_argument(
        "--lease-s",
        type=float,
        default=LEASE_S,
        help="a run's lease in Redis lives this long unless renewed: how soon another monitor may take over a dead one's runs",
    )
    sp.add_argument("--window-steps", type=int, default=1000, help="rolling window of the live correlations")
    sp.add_argument("--ew-alpha", type=float, default=0.01, help="weight of a new step in the EW correlations")
    sp.add_argument("--top-k", type=int, default=10, help="top activating steps kept per channel")
    sp.add_argument("--no-analytics", action="store_true", help="keep only counters and moments")
    sp.add_argument("--rules", help="YAML alert rules (see deploy/alerts.example.yaml)")
    sp.add_argument(
        "--control-endpoint", help="endpoint of the live-steering channel the monitor binds (default: --endpoint's port + 1)"
    )
    add_monitor_flags(sp)
    sp.add_argument(
        "--metrics-port", type=int, default=METRICS_PORT, help="Prometheus /metrics on loopback (0: any free port, -1: off)"
    )
    sp.add_argument(
        "--alert-idle-s",
        type=float,
        default=60.0,
        help="a run that sends nothing this long has its pending and firing alerts resolved (0: never)",
    )
    sp.add_argument("--auto-train", help="SOURCE>TARGET tap pairs (comma separated) to train transcoders for after a warm-up")
    sp.add_argument("--auto-train-steps", type=int, default=2000, help="warm-up steps recorded before auto-training")
    sp.add_argument("--auto-train-latents", default="4", help="latent sizes for auto-training, comma separated")
    sp.add_argument("--auto-train-epochs", type=int, default=30)
    sp.set_defaults(fn=cmd_monitor)

    sp = sub.add_parser("alerts", help="alerts the monitor raised (--follow to stream them)")
    common(sp)
    sp.add_argument("--run")
    sp.add_argument("--follow", action="store_true", help="keep printing new alerts")
    sp.add_argument("--json", action="store_true", help="one JSON document (with --follow: one JSON line per alert)")
    sp.add_argument("--last", type=int, default=50, help="how many past alerts to show")
    sp.add_argument("--max", type=int, help="with --follow: exit after this many alerts")
    sp.set_defaults(fn=cmd_alerts)

    sp = sub.add_parser("rules", help="check a rules file, or test it on a recording")
    rules_sub = sp.add_subparsers(dest="rules_cmd", required=True)
    rp = rules_sub.add_parser("check", help="validate every field of a rules file, webhooks included")
    common(rp)
    rp.add_argument("file")
    rp.set_defaults(fn=cmd_rules_check)
    rp = rules_sub.add_parser("test", help="replay a recording through the rules and print what would have fired")
    common(rp)
    rp.add_argument("file")
    rp.add_argument("--recording", required=True, help="a directory `interlatent record` wrote")
    rp.add_argument("--run", help="the run name the rules' run globs see (default: the recording's)")
    rp.add_argument("--window-steps", type=int, default=1000, help="the correlation window corr_flip rules see")
    rp.add_argument("--chunk", type=int, default=256, help="steps evaluated at a time (the agent's frames)")
    rp.add_argument("--all-states", action="store_true", help="print pending and inactive events too")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(fn=cmd_rules_test)

    sp = sub.add_parser("status", help="what is streaming: runs, taps, rows, drops, gaps, rejects")
    common(sp)
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp.set_defaults(fn=cmd_status)

    sp = sub.add_parser("stats", help="per channel: statistics, correlation with each metric, top examples")
    common(sp)
    sp.add_argument("--run", required=True)
    sp.add_argument("--tap", help="one tap (default: all of the run's taps)")
    sp.add_argument("--top", type=int, default=5, help="top examples per channel")
    sp.add_argument("--show", type=int, default=16, help="channels shown per tap without --json")
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp.set_defaults(fn=cmd_stats)

    sp = sub.add_parser("record", help="have the monitor record a run's activations and metrics to disk")
    common(sp)
    sp.add_argument("--run", required=True)
    sp.add_argument("--steps", type=int, required=True, help="how many steps to record")
    sp.add_argument("--no-wait", dest="wait", action="store_false", help="return at once instead of waiting with a progress bar")
    sp.add_argument("--timeout-s", type=float, default=3600.0, help="give up waiting after this long (the recording goes on)")
    sp.set_defaults(fn=cmd_record)

    sp = sub.add_parser("train", help="train transcoders of several sizes from a recording")
    common(sp)
    sp.add_argument("--run", required=True)
    sp.add_argument("--source", required=True, help="tap the transcoder reads")
    sp.add_argument("--target", required=True, help="tap it reconstructs (the source itself for an SAE)")
    sp.add_argument("--latents", default="2,4,8", help="latent sizes, comma separated")
    sp.add_argument("--l1", type=float, default=1e-5)
    sp.add_argument("--epochs", type=int, default=50)
    sp.add_argument("--batch", type=int, default=256)
    sp.add_argument("--lr", type=float, default=1e-3)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--arch", choices=["relu", "topk"], default="relu")
    sp.add_argument("--k", type=int, help="active latents per row for --arch topk")
    sp.add_argument("--recording", help="a recording directory (default: the run's latest `interlatent record`)")
    sp.add_argument("--threads", type=int, default=1, help="torch threads for training")
    sp.add_argument(
        "--agent", help="'demo' or package.module:factory returning (module, make_env, act): measures return recovered"
    )
    sp.add_argument("--eval-episodes", type=int, default=10, help="episodes per condition for return recovered")
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp.set_defaults(fn=cmd_train)

    sp = sub.add_parser("transcoders", help="every registered transcoder with its quality figures")
    common(sp)
    onoff = sp.add_mutually_exclusive_group()
    onoff.add_argument("--activate", metavar="NAME", help="have the monitor encode with this transcoder again")
    onoff.add_argument(
        "--deactivate", metavar="NAME", help="have the monitor stop encoding with this transcoder (it stays registered)"
    )
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp.set_defaults(fn=cmd_transcoders)

    sp = sub.add_parser("inspect", help="per latent: statistics, top triggering steps, correlation with each metric")
    common(sp)
    sp.add_argument("--run", required=True)
    sp.add_argument("--transcoder", required=True, help="a name from `interlatent transcoders`")
    sp.add_argument("--recording", help="a recording directory (default: the run's latest `interlatent record`)")
    sp.add_argument("--top", type=int, default=5)
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp.set_defaults(fn=cmd_inspect)

    sp = sub.add_parser("report", help="multiscale comparison of a run's transcoders: a markdown table and a plot")
    common(sp)
    sp.add_argument("--run", required=True)
    sp.add_argument("--out", help="folder for report.md and multiscale.png (default DATA_DIR/reports/RUN)")
    sp.set_defaults(fn=cmd_report)

    sp = sub.add_parser("import", help="register an SAELens- or sparsify-format directory as a transcoder")
    common(sp)
    sp.add_argument("path")
    sp.add_argument("--run", required=True)
    sp.add_argument("--source", required=True)
    sp.add_argument("--target", required=True)
    sp.add_argument("--name")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_import)

    sp = sub.add_parser("judge", help="measure a registered transcoder on a run's recording and store the figures")
    common(sp)
    sp.add_argument("name", help="a name from `interlatent transcoders`")
    sp.add_argument("--run", required=True, help="the run whose recording it is judged on")
    sp.add_argument("--recording", help="a recording directory (default: the run's latest `interlatent record`)")
    sp.add_argument(
        "--agent", help="'demo' or package.module:factory returning (module, make_env, act): measures return recovered"
    )
    sp.add_argument("--eval-episodes", type=int, default=10, help="episodes per condition for return recovered")
    sp.add_argument("--threads", type=int, default=1, help="torch threads")
    sp.add_argument("--json", action="store_true", help="print the updated registry entry as JSON")
    sp.set_defaults(fn=cmd_judge)

    sp = sub.add_parser("explainer", help="run an explainer worker (jobs from Redis, explanations back)")
    common(sp)
    sp.add_argument(
        "--backend",
        help="rules, hf:PATH (a local causal LM) or openai:BASE_URL (default $INTERLATENT_EXPLAINER_BACKEND, else rules)",
    )
    sp.add_argument(
        "--scorer",
        help="the judge that scores explanations: rules, hf:PATH or openai:BASE_URL (default $INTERLATENT_EXPLAINER_SCORER, "
        "else the backend itself)",
    )
    sp.add_argument(
        "--reclaim-s",
        type=float,
        help="a job whose worker has not renewed its claim for this long is taken over by another "
        "(default $INTERLATENT_EXPLAINER_RECLAIM_S, else 30); a live worker renews every quarter of it",
    )
    sp.add_argument("--llm-timeout-s", type=float, help="per LLM HTTP call (default $INTERLATENT_LLM_TIMEOUT_S, else 30)")
    sp.add_argument(
        "--llm-retries", type=int, help="retries of a failed LLM HTTP call (default $INTERLATENT_LLM_RETRIES, else 2)"
    )
    sp.add_argument("--history", type=int, help="explanations kept per latent (default $INTERLATENT_EXPLAINER_HISTORY, else 10)")
    sp.add_argument(
        "--max-deliveries",
        type=int,
        help="a job handed out this often, its workers dying each time, is given up "
        "(default $INTERLATENT_EXPLAINER_MAX_DELIVERIES, else 3)",
    )
    sp.add_argument("--burst", action="store_true", help="explain what is waiting, then exit")
    sp.set_defaults(fn=cmd_explainer)

    sp = sub.add_parser("explain", help="file an explain job for one latent")
    common(sp)
    sp.add_argument("--run", required=True)
    sp.add_argument("--latent", required=True, help="TAP/INDEX")
    sp.set_defaults(fn=cmd_explain)

    sp = sub.add_parser("explanations", help="the explanations of a run's latents, with their scores")
    common(sp)
    sp.add_argument("--run", required=True)
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp.set_defaults(fn=cmd_explanations)

    sp = sub.add_parser("evaluate-alerts", help="precision, recall and lead time of each rule for upcoming failures")
    common(sp)
    sp.add_argument("--run", required=True)
    sp.add_argument("--k", type=int, default=20, help="an alert is right if a failure follows within k steps")
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp.set_defaults(fn=cmd_evaluate_alerts)

    sp = sub.add_parser("demo", help="start the services and stream a CartPole PPO agent into them")
    common(sp, endpoint=True)
    sp.add_argument(
        "--headless",
        action="store_true",
        help="no panel: run until every part has shown (at most 12000 steps, a minute) or --steps steps, print what each showed, exit",
    )
    sp.add_argument("--steps", type=int, help="steps to run (default: until Ctrl-C; with --headless, until every part has shown)")
    sp.add_argument("--rate", type=float, default=200.0, help="the agent's steps per second (0: as fast as it goes)")
    sp.add_argument("--push-prob", type=float, default=0.01, help="chance per step of a random push on the cart or the pole")
    sp.add_argument("--rules", help="alert rules for the monitor (default deploy/demo-rules.yaml)")
    sp.add_argument("--no-steer", action="store_true", help="do not steer a latent once the latents exist")
    sp.add_argument("--train-steps", type=int, default=TRAIN_STEPS, help="PPO training steps for the cached demo policy")
    sp.add_argument("--warmup-steps", type=int, default=1000, help="steps recorded before the monitor trains the demo transcoder")
    sp.add_argument("--panel-port", type=int, default=PANEL_PORT, help="port of the live panel (not started with --headless)")
    sp.set_defaults(fn=cmd_demo)

    add_live_parsers(sub, common)
    add_experiment_parsers(sub, common)
    add_steer_parsers(sub, common)
    add_runs_parsers(sub, common)

    add_bench_parsers(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.fn(args, Settings.from_args(args))
    except (ConfigError, BackendError) as e:
        print(f"interlatent: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `interlatent status | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0


if __name__ == "__main__":
    sys.exit(main())
