"""Train transcoders of several sizes from a recording, judge them, save and register them.

:func:`judge` gives any transcoder (trained here or imported) the same figures on a recording;
:func:`undertrained` says whether a training run stopped while its validation loss still fell.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from monitor.store.recording import Recording
from monitor.transcoders.artifacts import save_artifact
from monitor.transcoders.model import TrainConfig, Transcoder, quality, train_transcoder

__all__ = ["train_sizes", "judge", "undertrained", "artifact_info", "safe_name"]

log = logging.getLogger(__name__)


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
        "skip": model.W_skip is not None,
        "input_norm": model.input_norm,
        "active": True,
        "quality": q,
        "created": time.time(),
        **(extra or {}),
    }


def undertrained(val_loss: list[float], *, epochs: int, tail_frac: float = 0.1, min_gain: float = 0.01) -> bool:
    """True when all ``epochs`` ran (early stopping never triggered) and the best validation loss
    of the last ``tail_frac`` of them beat the best before by more than ``min_gain`` (relative):
    the loss was still falling, so more epochs would help.

    >>> undertrained([4.0, 2.0, 1.0, 0.5], epochs=4)
    True
    """
    n = len(val_loss)
    if n < epochs or n < 2:
        return False
    tail = max(1, round(n * tail_frac))
    before, after = min(val_loss[:-tail]), min(val_loss[-tail:])
    return before > 0 and (before - after) / before > min_gain


def _figures(
    model: Transcoder, src: np.ndarray, tgt: np.ndarray, *, source: str, target: str, agent: Any, eval_episodes: int
) -> dict[str, Any]:
    """Reconstruction figures on these rows, and with an ``agent`` the return recovered when spliced."""
    q: dict[str, Any] = quality(model, src, tgt)
    if agent is not None:
        from monitor.transcoders.splice import return_recovered

        q.update(return_recovered(agent, model, source, target, episodes=eval_episodes))
    return q


def judge(
    model: Transcoder, recording: Recording, *, source: str, target: str, agent: Any = None, eval_episodes: int = 10
) -> dict[str, Any]:
    """The figures :func:`train_sizes` gives a trained transcoder (MSE, FVU, L0, dead and dense
    fractions, and given an ``agent`` the return recovered), over every paired row of ``recording``.
    Raises ValueError when a tap's width does not fit the model."""
    src, tgt = recording.pair(source, target)
    for tap, have, field, want in ((source, src.shape[1], "d_in", model.d_in), (target, tgt.shape[1], "d_out", model.d_out)):
        if have != want:
            raise ValueError(
                f"tap {tap!r} is {have} wide in the recording at {recording.dir}, but the transcoder's {field} is {want}"
            )
    if len(src) == 0:
        raise ValueError(f"the recording at {recording.dir} has no rows of {source!r} and {target!r} at the same steps")
    return _figures(model, src, tgt, source=source, target=target, agent=agent, eval_episodes=eval_episodes)


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
    when spliced into the policy; returns their registry entries. An entry whose validation loss
    was still falling at the last epoch (see :func:`undertrained`) has ``undertrained`` True and a
    ``hint``; one warning is logged for them all."""
    src, tgt = recording.pair(source, target)
    out = []
    for d_sae in sizes:
        cfg = dataclasses.replace(base, d_sae=d_sae)
        model, hist = train_transcoder(src, tgt, cfg, progress=progress)
        val = np.asarray(hist["val_rows"], dtype=np.int64)
        q = _figures(model, src[val], tgt[val], source=source, target=target, agent=agent, eval_episodes=eval_episodes)
        short = undertrained(hist["val_loss"], epochs=cfg.epochs)
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
                extra={
                    "epochs_run": hist["epochs_run"],
                    "rows": len(src),
                    "undertrained": short,
                    **({"hint": _longer(cfg.epochs)} if short else {}),
                },
            )
        )
    short_names = [t["name"] for t in out if t["undertrained"]]
    if short_names:
        log.warning("undertrained: %s; %s", ", ".join(short_names), _longer(base.epochs))
    return out


def _longer(epochs: int) -> str:
    return f"the validation loss was still falling after all {epochs} epochs: train longer, e.g. --epochs {4 * epochs}"
