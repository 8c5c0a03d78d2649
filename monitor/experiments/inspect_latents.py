"""Feature inspection, as in the seed post: per latent its max, mean, std and fraction active,
the top-k triggering steps with their metric values, and its Pearson correlation with each
metric, all over a recording."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from monitor.store.recording import Recording
from monitor.transcoders.model import Transcoder

__all__ = ["inspect_latents"]


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 6)


@torch.no_grad()
def inspect_latents(model: Transcoder, recording: Recording, source: str, *, top: int = 5) -> dict[str, Any]:
    (x,), met, pos = recording.paired(source)
    z = model.encode(torch.as_tensor(np.asarray(x, dtype=np.float32))).numpy().astype(np.float64)
    names = recording.metric_names
    zc, mc = z - z.mean(0), met - met.mean(0)
    den = np.sqrt(np.outer((zc**2).sum(0), (mc**2).sum(0)))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(den > 0, zc.T @ mc / den, np.nan)
    latents = []
    for j in range(z.shape[1]):
        order = np.argsort(-z[:, j], kind="stable")[:top]
        latents.append(
            {
                "latent": j,
                "max": _num(z[:, j].max()),
                "mean": _num(z[:, j].mean()),
                "std": _num(z[:, j].std()),
                "frac_active": _num((z[:, j] > 0).mean()),
                "corr": {n: _num(corr[j, i]) for i, n in enumerate(names)},
                "top": [
                    {
                        "step": int(pos[r, 0]),
                        "index": int(pos[r, 1]),
                        "value": _num(z[r, j]),
                        "metrics": {n: _num(met[r, i]) for i, n in enumerate(names)},
                    }
                    for r in order
                    if z[r, j] > 0
                ],
            }
        )
    return {"rows": len(z), "metrics": names, "latents": latents}
