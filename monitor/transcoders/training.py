"""Train transcoders of several sizes from a recording, judge them, save and register them."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from monitor.store.recording import Recording
from monitor.transcoders.artifacts import save_artifact
from monitor.transcoders.model import TrainConfig, Transcoder, quality, train_transcoder

__all__ = ["train_sizes", "artifact_info", "safe_name"]


def safe_name(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)).strip("_")


def artifact_info(
    name: str,
    path: Path,
    model: Transcoder,
    *,
    run: str,
    source: str,
    target: str,
    q: dict[str, float] | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The registry entry of one transcoder (what `interlatent transcoders --json` lists)."""
    return {
        "name": name,
        "path": str(Path(path).resolve()),
        "run": run,
        "source": source,
        "target": target,
        "d_in": model.d_in,
        "d_sae": model.d_sae,
        "d_out": model.d_out,
        "architecture": model.arch,
        "k": model.k,
        "quality": q,
        "created": time.time(),
        **(extra or {}),
    }


def train_sizes(
    recording: Recording,
    *,
    run: str,
    source: str,
    target: str,
    sizes: list[int],
    base: TrainConfig,
    out_dir: Path,
    progress: bool = True,
    agent: Any = None,
    eval_episodes: int = 10,
) -> list[dict[str, Any]]:
    """One transcoder per size in ``sizes`` (the seed's 2/4/8 sweep), each judged on its own
    held-out rows and, given an ``agent`` (see :mod:`monitor.transcoders.splice`), by the return it recovers
    when spliced into the policy; returns their registry entries."""
    from monitor.transcoders.splice import return_recovered

    src, tgt = recording.pair(source, target)
    out = []
    for d_sae in sizes:
        cfg = dataclasses.replace(base, d_sae=d_sae)
        model, hist = train_transcoder(src, tgt, cfg, progress=progress)
        val = np.asarray(hist["val_rows"], dtype=np.int64)
        q: dict[str, Any] = quality(model, src[val], tgt[val])
        if agent is not None:
            q.update(return_recovered(agent, model, source, target, episodes=eval_episodes))
        name = safe_name(run, source, target, f"{cfg.arch}{d_sae}")
        path = save_artifact(
            out_dir / name,
            model,
            source=source,
            target=target,
            run=run,
            extra={
                "train": {k: v for k, v in dataclasses.asdict(cfg).items()},
                "epochs_run": hist["epochs_run"],
                "rows": len(src),
                "recording": str(recording.dir),
            },
        )
        out.append(
            artifact_info(
                name,
                path,
                model,
                run=run,
                source=source,
                target=target,
                q=q,
                extra={"epochs_run": hist["epochs_run"], "rows": len(src)},
            )
        )
    return out
