"""`interlatent sweep`, `probe` and `compare`: causal experiments and probes on a policy.

A policy is ``--policy demo`` (the demo's CartPole PPO) or ``--policy package.module:factory``
returning ``(module, make_env, act)`` (see :mod:`monitor.transcoders.splice`). A transcoder is a name from
the registry (``--transcoder``) or an artifact folder (``--artifact``).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monitor.cli.common import Settings, pin_threads
from monitor.store.records import ConfigError

__all__ = ["add_parsers", "cmd_sweep", "cmd_probe", "cmd_compare"]


def _agent(s: Settings, spec: str) -> Any:
    from monitor.experiments.agents import load_agent

    try:
        return load_agent(spec, data_dir=s.data_dir)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"cannot load --policy {spec!r}: {e}") from e


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


def _ints(text: str | None) -> list[int] | None:
    return None if not text else [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"--alphas must be numbers separated by commas, got {text!r}") from e
    if not vals or not all(math.isfinite(v) for v in vals):
        raise ConfigError(f"--alphas must be finite numbers, got {text!r}")
    return vals


def _dump(res: dict[str, Any]) -> str:
    return json.dumps(res, allow_nan=False, default=float)


def cmd_sweep(args: argparse.Namespace, s: Settings) -> int:
    from agent_side.steer import SteerError
    from monitor.experiments import sweep as sw

    pin_threads(args.threads)
    agent = _agent(s, args.policy)
    model, info = _transcoder(s, args.transcoder, args.artifact)
    tap = args.tap or info.get("target")
    if not tap:
        raise ConfigError("the transcoder does not say its target tap: pass --tap")
    kw: dict[str, Any] = dict(
        tap=tap, model=model, latents=_ints(args.latents), episodes=args.episodes, seed=args.seed, progress=not args.json
    )
    try:
        if args.scan:
            res = sw.scan(agent, alphas=_floats(args.alphas or "0.5,-0.5"), **kw)
        else:
            res = sw.sweep(agent, alphas=_floats(args.alphas or "1,-1,2.5,-2.5"), **kw)
    except SteerError as e:
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


def _obs_names(agent: Any, width: int) -> list[str]:
    env = agent[1]()
    env_id = getattr(getattr(env, "spec", None), "id", "") or ""
    env.close()
    if env_id.startswith("CartPole") and width == 4:
        from monitor.tools.demo import CARTPOLE_OBS

        return list(CARTPOLE_OBS)
    return [f"obs_{i}" for i in range(width)]


def cmd_probe(args: argparse.Namespace, s: Settings) -> int:
    from monitor.experiments import interrogate, probes

    pin_threads(args.threads)
    agent = _agent(s, args.policy)
    ro = probes.collect(agent, args.tap, episodes=args.episodes, seed=args.seed)
    names = _obs_names(agent, ro.obs.shape[1])
    kinds = [k for k in args.kinds.split(",") if k]
    if bad := [k for k in kinds if k not in probes.KINDS]:
        raise ConfigError(f"--kinds: unknown {bad}; choose from {probes.KINDS}")
    rows = probes.probe_table(ro.X, {n: ro.obs[:, i] for i, n in enumerate(names)}, kinds=kinds, seed=args.seed)
    res: dict[str, Any] = {
        "policy": args.policy,
        "tap": args.tap,
        "steps": int(len(ro.X)),
        "episodes": args.episodes,
        "return_mean": float(ro.returns.mean()),
        "probes": rows,
    }
    if args.metric:
        if args.metric not in names:
            raise ConfigError(f"--metric must be one of {names}")
        i = names.index(args.metric)
        res["polarity_inversion"] = interrogate.polarity_inversion(
            agent, args.tap, obs_index=i, metric_name=args.metric, episodes=args.episodes, seed=args.seed
        )
        direction = probes.fit_probe(ro.X, ro.obs[:, i], kind="ridge", seed=args.seed).direction
        res["ablation"] = interrogate.ablation_effect(agent, args.tap, direction, episodes=args.episodes, seed=args.seed)
    if args.subspace:
        res["subspace"] = interrogate.greedy_subspace(agent, args.tap, ro.X, episodes=args.episodes, seed=args.seed)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        probes.plot_probe_heatmap(rows, out / "probes.png", title=f"held-out R² at {args.tap}")
        if "subspace" in res:
            interrogate.plot_ablation_curve(res["subspace"]["curve"], out / "subspace.png", clean=res["subspace"]["return_clean"])
        (out / "probes.json").write_text(_dump(res))
    if args.json:
        print(_dump(res))
        return 0
    print(f"{args.tap}: {res['steps']} steps over {args.episodes} episodes (mean return {res['return_mean']:.1f}); held-out R²:")
    for r in rows:
        extra = f", {r['n_nonzero']} non-zero weights" if r["kind"] == "lasso" else ""
        print(f"  {r['metric']:<14} {r['kind']:<6} {r['r2_test']:+.3f}{extra}")
    if "polarity_inversion" in res:
        p, a = res["polarity_inversion"], res["ablation"]
        print(
            f"polarity inversion of {args.metric}: R² {p['r2_normal']:+.3f} -> {p['r2_inverted']:+.3f} (dropped: {p['dropped']})"
        )
        print(
            f"ablating its probe direction: return {a['return_clean']:.1f} -> {a['return_ablated']:.1f}"
            f" (a random direction: {a['return_random']:.1f})"
        )
    if "subspace" in res:
        print(f"smallest PCA subspace keeping 95% of the return: k = {res['subspace']['k']}")
    return 0


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


def add_parsers(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    sp = sub.add_parser("sweep", help="steer a policy along transcoder latents: mean return with CIs and failure modes per alpha")
    common(sp)
    sp.add_argument("--policy", default="demo", help="'demo' or package.module:factory returning (module, make_env, act)")
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
        "probe", help="probes from a tap to each observation component; polarity inversion, ablation, PCA subspace"
    )
    common(sp)
    sp.add_argument("--policy", default="demo")
    sp.add_argument("--tap", required=True)
    sp.add_argument("--episodes", type=int, default=10)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--kinds", default="ridge,lasso,mlp")
    sp.add_argument("--metric", help="run the polarity inversion and the probe-direction ablation for this observation")
    sp.add_argument("--subspace", action="store_true", help="find the smallest PCA subspace of the tap that keeps the return")
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
