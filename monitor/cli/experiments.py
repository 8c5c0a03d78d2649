"""`interlatent sweep`, `probe` and `compare`: causal experiments and probes on a policy.

A policy is ``--policy demo`` (the demo's CartPole PPO) or ``--policy package.module:factory``
returning ``(module, make_env, act)`` or ``(module, make_env, act, reset)`` (see
:mod:`monitor.experiments.agents`). A transcoder is a name from the registry (``--transcoder``) or
an artifact folder (``--artifact``). Every bad input (flags, the factory, the tap, the metric) is
refused in one line before the first episode runs.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monitor.cli.common import Settings, pin_threads
from monitor.store.records import ConfigError

__all__ = ["add_parsers", "cmd_sweep", "cmd_probe", "cmd_compare"]

PROBE_EPISODES = 20


def _agent(s: Settings, spec: str) -> Any:
    from monitor.experiments.agents import AgentError, load_agent

    try:
        return load_agent(spec, data_dir=s.data_dir)
    except AgentError as e:
        raise ConfigError(f"cannot load --policy {spec!r}: {e}") from e


def _tap(agent: Any, tap: str) -> None:
    """The tap's module exists in the agent (close matches if not); nothing runs."""
    from agent_side.taps import TapError, parse_tap, resolve

    try:
        if agent[0] is None:
            raise TapError("the agent has no module to tap")
        resolve(agent[0], parse_tap(tap))
    except TapError as e:
        raise ConfigError(f"--tap {tap}: {e}") from e


def _at_least(flag: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ConfigError(f"{flag} must be at least {low}, got {value}")


def _transcoder(s: Settings, name: str | None, artifact: str | None) -> tuple[Any, dict[str, Any]]:
    """(model, info with source and target) from the registry or an artifact folder."""
    from monitor.transcoders.artifacts import ArtifactError, load_artifact

    if artifact:
        path, info = artifact, {"name": Path(artifact).name}
    elif name:
        found = next((t for t in s.store().transcoders() if t["name"] == name), None)
        if found is None:
            raise ConfigError(f"no transcoder {name!r}; `interlatent transcoders` lists them")
        path, info = found["path"], found
    else:
        raise ConfigError("pass --transcoder NAME (see `interlatent transcoders`) or --artifact DIR")
    try:
        model, cfg = load_artifact(path)
    except ArtifactError as e:
        raise ConfigError(str(e)) from e
    meta = cfg.get("metadata", {}) if isinstance(cfg, dict) else {}
    info = {**info, "source": info.get("source") or meta.get("source"), "target": info.get("target") or meta.get("target")}
    return model.eval(), info


def _ints(flag: str, text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals:
        raise ConfigError(f"{flag} must be integers separated by commas, got {text!r}")
    return vals


def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"--alphas must be numbers separated by commas, got {text!r}") from e
    if not vals or not all(math.isfinite(v) for v in vals):
        raise ConfigError(f"--alphas must be finite numbers, got {text!r}")
    return vals


def _finite(obj: Any) -> Any:
    """JSON has no NaN: a NaN or infinite number (an R² of a constant metric) becomes null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _dump(res: dict[str, Any]) -> str:
    return json.dumps(_finite(res), allow_nan=False, default=float)


def cmd_sweep(args: argparse.Namespace, s: Settings) -> int:
    from agent_side.steer import SteerError, steer_latent
    from agent_side.taps import TapError
    from monitor.experiments import probes
    from monitor.experiments import sweep as sw

    _at_least("--episodes", args.episodes, 1)
    alphas = _floats(args.alphas or ("0.5,-0.5" if args.scan else "1,-1,2.5,-2.5"))
    latents = _ints("--latents", args.latents)
    pin_threads(args.threads)
    agent = _agent(s, args.policy)
    model, info = _transcoder(s, args.transcoder, args.artifact)
    tap = args.tap or info.get("target")
    if not tap:
        raise ConfigError("the transcoder does not say its target tap: pass --tap")
    _tap(agent, tap)
    try:
        latents = sw.check_latents(model, latents)
    except ValueError as e:
        raise ConfigError(f"--latents: {e}") from e
    try:
        with steer_latent(agent[0], tap, model, latents[0], op="add", alpha=0.0):
            probes.first_step(agent, tap, seed=args.seed)  # one forward: the decoder row fits the tap
    except (SteerError, TapError) as e:
        raise ConfigError(f"cannot steer {tap} with {info['name']}: {e}") from e
    kw: dict[str, Any] = dict(
        tap=tap, model=model, latents=latents, episodes=args.episodes, seed=args.seed, progress=not args.json
    )
    try:
        res = (sw.scan if args.scan else sw.sweep)(agent, alphas=alphas, **kw)
    except (SteerError, TapError) as e:
        raise ConfigError(f"cannot steer {tap} with {info['name']}: {e}") from e
    res["transcoder"] = info["name"]
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(_dump(res))
        (out / "sweep.md").write_text(sw.sweep_table_md(res))
        sw.plot_sweep(res, out / "sweep.png", title=f"{info['name']} at {tap}")
    if args.json:
        print(_dump(res))
        return 0
    print(sw.sweep_table_md(res))
    if args.scan:
        found = res.get("improving") or []
        print(
            f"\n{len(found)} of {res['tests']} (latent, alpha) cells raise the mean return significantly "
            f"(Bonferroni-adjusted {res['bonferroni_level']:.4f} intervals)"
        )
    if args.out:
        print(f"\nwrote {Path(args.out) / 'sweep.md'}, sweep.json and sweep.png")
    return 0


def _obs_names(agent: Any, seed: int) -> list[str]:
    """Names of the observation's components (CartPole's by name, else obs_0, obs_1, ...), from
    one ``env.reset``; no step is taken."""
    import numpy as np

    from monitor.experiments.agents import CARTPOLE_OBS

    env = agent[1]()
    try:
        obs, _ = env.reset(seed=seed)
        env_id = getattr(getattr(env, "spec", None), "id", "") or ""
    finally:
        env.close()
    width = int(np.asarray(obs).size)
    if env_id.startswith("CartPole") and width == len(CARTPOLE_OBS):
        return list(CARTPOLE_OBS)
    return [f"obs_{i}" for i in range(width)]


def _probe_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The probe kinds and ablation modes, every number flag checked."""
    from monitor.experiments import interrogate, probes

    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or (bad := [k for k in kinds if k not in probes.KINDS]):
        raise ConfigError(f"--kinds: unknown {bad if kinds else 'none given'}; choose from {', '.join(probes.KINDS)}")
    modes = [m for m in args.ablation.split(",") if m]
    if not modes or any(m not in interrogate.ABLATIONS for m in modes):
        raise ConfigError(
            f"--ablation must be some of {', '.join(interrogate.ABLATIONS)} separated by commas, got {args.ablation!r}"
        )
    for flag, value, low in (
        ("--episodes", args.episodes, 1),
        ("--folds", args.folds, 2),
        ("--random-directions", args.random_directions, 1),
        ("--candidates", args.candidates, 1),
        ("--max-k", args.max_k, 1),
    ):
        _at_least(flag, value, low)
    if not 0.0 < args.keep <= 1.0:
        raise ConfigError(f"--keep must be in (0, 1], got {args.keep}")
    return kinds, modes


def cmd_probe(args: argparse.Namespace, s: Settings) -> int:
    from agent_side.steer import SteerError
    from agent_side.taps import TapError
    from monitor.experiments import interrogate, probes, subspace

    kinds, modes = _probe_args(args)
    pin_threads(args.threads)
    agent = _agent(s, args.policy)
    _tap(agent, args.tap)
    names = _obs_names(agent, args.seed)
    if args.metric and args.metric not in names:
        close = difflib.get_close_matches(args.metric, names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"--metric {args.metric!r} is not an observation component; {hint}choose from {', '.join(names)}")
    try:
        _, rows = probes.first_step(agent, args.tap, seed=args.seed)
        if rows.shape[0] != 1:
            raise TapError(f"it gives {rows.shape[0]} rows for one observation; probes need one per step")
        ro = probes.collect(agent, args.tap, episodes=args.episodes, seed=args.seed)
    except TapError as e:
        raise ConfigError(f"--tap {args.tap}: {e}") from e
    try:
        table = probes.probe_table(
            ro.X, {n: ro.obs[:, i] for i, n in enumerate(names)}, kinds=kinds, folds=args.folds, seed=args.seed
        )
    except ValueError as e:  # too few steps for the folds
        raise ConfigError(f"{len(ro.X)} steps over {args.episodes} episodes are too few to probe ({e}): raise --episodes") from e
    res: dict[str, Any] = {
        "policy": args.policy,
        "tap": args.tap,
        "steps": int(len(ro.X)),
        "episodes": args.episodes,
        "folds": args.folds,
        "return_mean": float(ro.returns.mean()),
        "returns": [float(r) for r in ro.returns],
        "probes": table,
    }
    runs = dict(episodes=args.episodes, seed=args.seed)
    try:
        if args.metric:
            i = names.index(args.metric)
            res["polarity_inversion"] = interrogate.polarity_inversion(
                agent, args.tap, obs_index=i, metric_name=args.metric, folds=args.folds, **runs
            )
            direction = probes.fit_probe(ro.X, ro.obs[:, i], kind="ridge", seed=args.seed).direction
            if direction is None:
                raise ConfigError(f"the ridge probe of {args.metric} has no direction (all weights zero): nothing to ablate")
            res["ablation"] = interrogate.ablation_effect(
                agent, args.tap, direction, X=ro.X, modes=modes, random_directions=args.random_directions, **runs
            )
            res["ablation"]["direction"] = f"ridge probe of {args.metric}"
        if args.subspace:
            res["subspace"] = subspace.greedy_subspace(
                agent, args.tap, ro.X, keep=args.keep, candidates=args.candidates, max_k=args.max_k, **runs
            )
    except (TapError, SteerError) as e:
        raise ConfigError(f"--tap {args.tap}: {e}") from e
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        probes.plot_probe_heatmap(table, out / "probes.png", title=f"held-out R² at {args.tap}")
        if "subspace" in res:
            sub = res["subspace"]
            interrogate.plot_ablation_curve(
                sub["curve"],
                out / "subspace.png",
                clean=sub["return_clean"],
                keep=sub["keep"],
                variance_curve=sub.get("variance_order", {}).get("curve"),
            )
        (out / "probes.json").write_text(_dump(res))
    if args.json:
        print(_dump(res))
        return 0
    for line in _probe_text(res, args.metric):
        print(line)
    return 0


def _num(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def _ci(pair: list[float | None], spec: str = ".1f") -> str:
    return f"[{_num(pair[0], spec)}, {_num(pair[1], spec)}]"


def _probe_text(res: dict[str, Any], metric: str | None) -> list[str]:
    """What `interlatent probe` prints without --json."""
    from monitor.stats.intervals import mean_ci

    m, lo, hi = mean_ci(res["returns"])
    lines = [
        f"{res['tap']}: {res['steps']} steps over {res['episodes']} episodes, mean return {m:.1f} {_ci([lo, hi])}",
        f"held-out R², mean ± sd over {res['folds']} folds of contiguous blocks of steps:",
    ]
    for r in res["probes"]:
        extra = f", {r['n_nonzero']} non-zero weights" if r["kind"] == "lasso" else ""
        lines.append(f"  {r['metric']:<14} {r['kind']:<6} {_num(r['r2_test'], '+.3f')} ± {_num(r['r2_test_sd'], '.3f')}{extra}")
    if "polarity_inversion" in res:
        p = res["polarity_inversion"]
        lines += [
            f"polarity inversion of {metric}: R² {_num(p['r2_normal'], '+.3f')} ± {_num(p['r2_normal_sd'], '.3f')}"
            f" -> {_num(p['r2_inverted'], '+.3f')} ± {_num(p['r2_inverted_sd'], '.3f')} (dropped: {p['dropped']});"
            f" against the negated value {_num(p['r2_vs_negated'], '+.3f')}",
            f"  return {p['return_normal']:.1f} -> {p['return_inverted']:.1f}, difference {_num(p['diff']['mean'])}"
            f" {_ci(p['diff']['ci'])} (Welch 95%, {p['episodes']} episodes each)",
        ]
    if "ablation" in res:
        a = res["ablation"]
        lines.append(
            f"ablating the direction of the {a['direction']}, {a['episodes']} episodes each (Welch 95% intervals;"
            f" {a['random_directions']} random unit directions as controls, p the share of them, this one counted,"
            " that hurt at least as much):"
        )
        for mode, c in a["ablations"].items():
            r = c["random"]
            held = "" if mode == "zero" else f" (held at its mean {c['value']:+.3f})"
            lines.append(
                f"  {mode}-ablation{held}: return {a['return_clean']:.1f} -> {c['mean']:.1f}, difference"
                f" {_num(c['diff']['mean'])} {_ci(c['diff']['ci'])}; random directions {r['mean']:+.1f}"
                f" ± {_num(r['sd'])} (min {r['min']:+.1f}, max {r['max']:+.1f}), p = {r['p_empirical']:.2f}"
            )
    if "subspace" in res:
        sub = res["subspace"]
        lines.append(
            f"smallest PCA subspace keeping {sub['keep']:.0%} of the return (bar {sub['bar']:.1f}),"
            f" {sub['episodes']} episodes per point, bootstrap 95% interval of k:"
        )
        for label, c in (("greedy by return", sub), ("variance order", sub.get("variance_order"))):
            if c is None:
                continue
            last = c["curve"][-1][0] if c["curve"] else 0
            lo_k, hi_k = (f"> {last}" if v is None else str(v) for v in c["k_ci"])
            k = f"none up to {last}" if c["k"] is None else f"{c['k']} [{lo_k}, {hi_k}]"
            comps = f", components {c['components']} ({c['explained_variance'] * 100:.3g}% of the variance)" if c["k"] else ""
            curve = ", ".join(f"{k_}: {ret:.1f}" for k_, ret in c["curve"])
            lines.append(f"  {label + ':':<17} k = {k}{comps}; return by k: {curve}")
    return lines


def cmd_compare(args: argparse.Namespace, s: Settings) -> int:
    from monitor.experiments.compare import compare_report, match_latents
    from monitor.store.jobs import explanations

    a, info_a = _transcoder(s, args.a, None)
    b, info_b = _transcoder(s, args.b, None)
    res = match_latents(a, b, threshold=args.threshold)
    store = s.store()

    def expl(info: dict[str, Any]) -> dict[int, str]:
        return {
            e["latent"]: e.get("label", "")
            for e in explanations(store.r, info["run"])
            if e.get("tap") == f"latents:{info['name']}"
        }

    res.update(a=info_a["name"], b=info_b["name"])
    if args.json:
        print(_dump(res))
        return 0
    print(
        compare_report(
            res, explanations_a=expl(info_a), explanations_b=expl(info_b), name_a=info_a["name"], name_b=info_b["name"]
        )
    )
    return 0


POLICY_HELP = "'demo' or package.module:factory returning (module, make_env, act) or (module, make_env, act, reset)"


def add_parsers(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    sp = sub.add_parser("sweep", help="steer a policy along transcoder latents: mean return with CIs and failure modes per alpha")
    common(sp)
    sp.add_argument("--policy", default="demo", help=POLICY_HELP)
    sp.add_argument("--transcoder", help="a registered transcoder (`interlatent transcoders`)")
    sp.add_argument("--artifact", help="or a transcoder artifact folder")
    sp.add_argument("--tap", help="where to add the decoder row (default: the transcoder's target)")
    sp.add_argument("--latents", help="latents to test, comma separated (default: all)")
    sp.add_argument("--alphas", help="default 1,-1,2.5,-2.5 (the seed's); with --scan 0.5,-0.5")
    sp.add_argument("--episodes", type=int, default=50, help="baseline and intervened episodes per cell (the seed's 50)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument(
        "--scan", action="store_true", help="every latent at small ±alpha; report those that raise the return significantly"
    )
    sp.add_argument("--out", help="folder for sweep.md, sweep.json and sweep.png")
    sp.add_argument("--threads", type=int, default=1)
    sp.add_argument("--json", action="store_true", help="print the result as one JSON document")
    sp.set_defaults(fn=cmd_sweep)

    sp = sub.add_parser(
        "probe",
        help="the interrogation protocol at a tap: probes for each observation component, polarity inversion,"
        " ablation, minimal PCA subspace, each with its interval",
    )
    common(sp)
    sp.add_argument("--policy", default="demo", help=POLICY_HELP)
    sp.add_argument("--tap", required=True, help="module:in or module:out, one row per step")
    sp.add_argument(
        "--episodes",
        type=int,
        default=PROBE_EPISODES,
        help=f"episodes per condition: the probes' rollouts, and each of clean, inverted, ablated, every random"
        f" control and every subspace point (default {PROBE_EPISODES}: a Welch 95%% interval of a difference"
        " then spans about ±0.64 of the return's sd)",
    )
    sp.add_argument("--seed", type=int, default=0, help="episode i is reset with seed + i in every condition")
    sp.add_argument("--kinds", default="ridge,lasso,mlp", help="probe kinds, comma separated")
    sp.add_argument(
        "--folds", type=int, default=5, help="held-out R² as mean ± sd over this many contiguous blocks of steps (default 5)"
    )
    sp.add_argument("--metric", help="run the polarity inversion and the probe-direction ablation for this observation")
    sp.add_argument(
        "--ablation",
        default="zero,mean",
        help="zero (set the component to 0), mean (to its mean over the recorded rows) or both (default zero,mean)",
    )
    sp.add_argument("--random-directions", type=int, default=8, help="random unit directions ablated as controls (default 8)")
    sp.add_argument(
        "--subspace", action="store_true", help="the fewest PCA components, chosen greedily by return, that keep the return"
    )
    sp.add_argument(
        "--keep", type=float, default=0.95, help="the subspace keeps this fraction of the clean return (default 0.95)"
    )
    sp.add_argument(
        "--candidates", type=int, default=16, help="greedy chooses among the top N components by variance (default 16)"
    )
    sp.add_argument("--max-k", type=int, help="stop the subspace curves at this many components (default: every candidate)")
    sp.add_argument("--out", help="folder for probes.png, subspace.png and probes.json")
    sp.add_argument("--threads", type=int, default=1)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_probe)

    sp = sub.add_parser("compare", help="match the latents of two transcoders (two policies or checkpoints)")
    common(sp)
    sp.add_argument("a", help="a registered transcoder")
    sp.add_argument("b", help="another one, on a tap of the same width")
    sp.add_argument("--threshold", type=float, default=0.5, help="decoder cosine above which two latents count as shared")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_compare)
