"""`interlatent train`, `transcoders`, `import` and `judge`: transcoder artifacts from the command line."""

from __future__ import annotations

import argparse
import difflib
import json
import time
from pathlib import Path
from typing import Any

from monitor.cli.common import Settings, pin_threads
from monitor.store.records import ConfigError, Store

__all__ = ["cmd_train", "cmd_transcoders", "cmd_import", "cmd_judge", "cmd_inspect", "cmd_report"]


def _recording_of(s: Settings, store: Store, run: str, path: str | None) -> Any:
    from monitor.store.recording import Recording, RecordingError

    if path is None:
        req = store.record_requests().get(run, {})
        if req.get("state") != "done":
            raise ConfigError(
                f"no finished recording of run {run!r}: record one with `interlatent record --run {run} --steps 20000`"
                " (or pass --recording DIR)"
            )
        path = req["path"]
    try:
        return Recording(path)
    except RecordingError as e:
        raise ConfigError(str(e)) from e


def _agent_of(s: Settings, spec: str | None) -> Any:
    if not spec:
        return None
    from monitor.experiments.agents import load_agent

    try:
        return load_agent(spec, data_dir=s.data_dir)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"cannot load --agent {spec!r}: {e}") from e


def _registered(store: Store, name: str) -> dict[str, Any]:
    info = next((t for t in store.transcoders() if t["name"] == name), None)
    if info is None:
        names = [t["name"] for t in store.transcoders()]
        raise ConfigError(f"no transcoder {name!r}; registered: {', '.join(names) or 'none'}")
    return info


def cmd_train(args: argparse.Namespace, s: Settings) -> int:
    from monitor.store.recording import RecordingError
    from monitor.transcoders.model import TrainConfig
    from monitor.transcoders.training import train_sizes

    pin_threads(args.threads)
    store = s.store()
    rec = _recording_of(s, store, args.run, args.recording)
    for tap in {args.source, args.target}:
        if tap not in rec.taps:
            raise ConfigError(f"tap {tap!r} is not in the recording {rec.dir}; it has {', '.join(rec.taps)}")
    try:
        sizes = [int(x) for x in args.latents.split(",")]
    except ValueError as e:
        raise ConfigError(f"--latents takes sizes like 2,4,8, got {args.latents!r}") from e
    base = TrainConfig(
        d_sae=sizes[0], l1=args.l1, epochs=args.epochs, batch=args.batch, lr=args.lr, seed=args.seed, arch=args.arch, k=args.k
    )
    agent = _agent_of(s, args.agent)
    try:
        infos = train_sizes(
            rec,
            run=args.run,
            source=args.source,
            target=args.target,
            sizes=sizes,
            base=base,
            out_dir=s.data_dir / "transcoders",
            progress=not args.json,
            agent=agent,
            eval_episodes=args.eval_episodes,
        )
    except (RecordingError, ValueError) as e:
        raise ConfigError(str(e)) from e
    for info in infos:
        store.register_transcoder(info)
    if args.json:
        print(json.dumps({"transcoders": infos}))
    else:
        _print_transcoders(infos)
        for t in infos:
            if t.get("undertrained"):
                print(f"warning: {t['name']} is undertrained: {t['hint']}")
    return 0


def _print_transcoders(infos: list[dict[str, Any]]) -> None:
    if not infos:
        print("no transcoders yet: `interlatent train ...` or `interlatent import PATH ...`")
    print(f"{'name':<60} {'d_sae':>5} {'L0':>6} {'FVU':>7} {'MSE':>9} {'dead':>5} {'return recovered':>17} {'active':>7}")
    for t in infos:
        if t.get("broken"):
            print(f"{t['name']:<60} broken: {t['broken']}")
            continue
        q = t.get("quality") or {}
        cells = [
            format(q[k], f) if q.get(k) is not None else "-"
            for k, f in (("l0", "6.2f"), ("fvu", "7.4f"), ("mse", "9.3g"), ("dead_frac", "5.2f"), ("return_recovered", "6.3f"))
        ]
        print(
            f"{t['name']:<60} {t['d_sae']:>5} {cells[0]:>6} {cells[1]:>7} {cells[2]:>9} {cells[3]:>5} {cells[4]:>17} "
            f"{'yes' if t.get('active', True) else 'no':>7}"
        )


def cmd_transcoders(args: argparse.Namespace, s: Settings) -> int:
    store = s.store()
    for name, active in ((args.activate, True), (args.deactivate, False)):
        if name is not None:
            if not store.set_transcoder_active(name, active):
                names = [t["name"] for t in store.transcoders()]
                raise ConfigError(f"no transcoder {name!r}; registered: {', '.join(names) or 'none'}")
            if not args.json:
                print(
                    f"transcoder {name!r} {'activated' if active else 'deactivated'}: the monitor "
                    f"{'starts' if active else 'stops'} encoding with it at its next flush"
                )
    infos = store.transcoders(include_broken=True)
    if args.json:
        print(json.dumps({"transcoders": infos}))
    else:
        _print_transcoders(infos)
    return 0


def cmd_import(args: argparse.Namespace, s: Settings) -> int:
    from monitor.transcoders.artifacts import ArtifactError, load_artifact
    from monitor.transcoders.model import quality
    from monitor.transcoders.training import artifact_info, safe_name

    try:
        model, _ = load_artifact(args.path)
    except ArtifactError as e:
        raise ConfigError(str(e)) from e
    store = s.store()
    streamed = store.taps(args.run)  # where the run is known, its taps must exist and their widths fit the weights
    for what, tap, width in (("source", args.source, model.d_in), ("target", args.target, model.d_out)):
        if streamed and tap not in streamed:
            close = difflib.get_close_matches(tap, list(streamed), n=3, cutoff=0.5)
            raise ConfigError(
                f"run {args.run!r} streams no tap {tap!r} (the {what})"
                + (f"; did you mean {', '.join(close)}?" if close else f"; it streams {', '.join(sorted(streamed))}")
            )
        have = streamed.get(tap, {}).get("width")
        if have is not None and have != width:
            raise ConfigError(
                f"{args.path}: the transcoder's {what} width is {width}, but run {args.run!r} streams {tap!r} {have} wide"
            )
    q = None
    req = store.record_requests().get(args.run, {})
    if req.get("state") == "done":  # judge it on the run's recording when there is one
        rec = _recording_of(s, store, args.run, None)
        if {args.source, args.target} <= set(rec.taps):
            src, tgt = rec.pair(args.source, args.target)
            if src.shape[1] == model.d_in and tgt.shape[1] == model.d_out:
                q = quality(model, src, tgt)
    name = args.name or safe_name(args.run, args.source, args.target, "imported", Path(args.path).name)
    info = artifact_info(
        name, Path(args.path), model, run=args.run, source=args.source, target=args.target, q=q, extra={"imported": True}
    )
    replaced = any(t["name"] == name for t in store.transcoders(include_broken=True))
    store.register_transcoder(info)
    verb = "replaced" if replaced else "registered"
    print(json.dumps(info) if args.json else f"{verb} {name} (d_in {model.d_in}, d_sae {model.d_sae}, d_out {model.d_out})")
    return 0


def cmd_judge(args: argparse.Namespace, s: Settings) -> int:
    from monitor.store.recording import RecordingError
    from monitor.transcoders.artifacts import ArtifactError, load_artifact
    from monitor.transcoders.training import judge

    pin_threads(args.threads)
    store = s.store()
    info = _registered(store, args.name)
    try:
        model, _ = load_artifact(info["path"])
    except ArtifactError as e:
        raise ConfigError(str(e)) from e
    rec = _recording_of(s, store, args.run, args.recording)
    for tap in {info["source"], info["target"]}:
        if tap not in rec.taps:
            raise ConfigError(
                f"tap {tap!r} of transcoder {args.name!r} is not in the recording {rec.dir}; it has {', '.join(rec.taps)}"
            )
    agent = _agent_of(s, args.agent)
    try:
        q = judge(model, rec, source=info["source"], target=info["target"], agent=agent, eval_episodes=args.eval_episodes)
    except (RecordingError, ValueError) as e:
        raise ConfigError(f"{args.name}: {e}") from e
    # re-read the entry: an --activate or --deactivate while the episodes ran must survive
    info = {
        **_registered(store, args.name),
        "quality": q,
        "judged": {"run": args.run, "recording": str(rec.dir.resolve()), "agent": args.agent, "at": time.time()},
    }
    store.register_transcoder(info)
    if args.json:
        print(json.dumps(info))
    else:
        print(f"judged {info['name']} on {q['rows']} rows of run {args.run} ({rec.dir})")
        _print_transcoders([info])
    return 0


def cmd_inspect(args: argparse.Namespace, s: Settings) -> int:
    from monitor.experiments.inspect_latents import inspect_latents
    from monitor.transcoders.artifacts import ArtifactError, load_artifact

    store = s.store()
    info = next((t for t in store.transcoders() if t["name"] == args.transcoder), None)
    if info is None:
        raise ConfigError(f"no transcoder {args.transcoder!r}; `interlatent transcoders` lists them")
    try:
        model, _ = load_artifact(info["path"])
    except ArtifactError as e:
        raise ConfigError(str(e)) from e
    rec = _recording_of(s, store, args.run, args.recording)
    res = {"run": args.run, "transcoder": info["name"], **inspect_latents(model, rec, info["source"], top=args.top)}
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{info['name']} over {res['rows']} recorded rows of run {args.run}")
    for lat in res["latents"]:
        strongest = sorted(((m, r) for m, r in lat["corr"].items() if r is not None), key=lambda mr: -abs(mr[1]))[:3]
        print(
            f"  latent {lat['latent']}: max {lat['max']}, mean {lat['mean']}, std {lat['std']}, active {lat['frac_active']}; "
            + ", ".join(f"r({m})={r:+.2f}" for m, r in strongest)
        )
        for t in lat["top"][:3]:
            print(
                f"      step {t['step']}: {t['value']:.3f}  "
                + " ".join(f"{m}={v:+.3f}" for m, v in list(t["metrics"].items())[:6])
            )
    return 0


def cmd_report(args: argparse.Namespace, s: Settings) -> int:
    from monitor.experiments.multiscale import write_report

    store = s.store()
    out = Path(args.out) if args.out else s.data_dir / "reports" / args.run.replace("/", "_")
    md = write_report(args.run, store.transcoders(), out)
    print(f"wrote {md} and {out / 'multiscale.png'}")
    return 0
