"""Online encoding: the monitor turns a source tap's rows into transcoder latents as they arrive.

Every registered, active transcoder whose run is the frame's run (or ``*``) and whose source is
the frame's tap encodes each frame; the latents enter the run as the tap ``latents:<name>``, so
statistics, correlations, alerts and recordings treat them exactly like raw channels. The set is
refreshed from the registry between frames: a newly registered transcoder takes over from the
next frame on, and no frame is dropped for it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monitor.store.keys import LATENT_PREFIX
from monitor.transcoders.artifacts import ArtifactError, load_artifact
from monitor.transcoders.model import Transcoder

__all__ = ["Encoders", "LATENT_PREFIX"]

log = logging.getLogger(__name__)


def _stamp(path: Any) -> tuple[tuple[str, int, int], ...] | None:
    """(name, mtime, size) of an artifact directory's files: a fixed file changes it."""
    try:
        d = Path(path)
        return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in d.iterdir() if p.is_file()))
    except (OSError, TypeError, ValueError):
        return None


class Encoders:
    def __init__(self) -> None:
        self.active: dict[str, tuple[dict[str, Any], Transcoder]] = {}  # name -> (registry entry, model)
        self._failed: set[tuple[str, Any, Any]] = set()  # (name, created, files' stamp) that did not load
        self.broken: dict[str, str] = {}  # name -> why it cannot be loaded, or cannot encode its tap
        self.width_skipped: dict[str, int] = {}
        self._stamps: dict[
            str, Any
        ] = {}  # name -> its files' stamp when loaded  # name -> frames not encoded for a width mismatch

    @property
    def failing(self) -> bool:
        """Whether the artifacts' files need a look now and then: one could not be loaded (it is
        retried when its files change), or some are loaded (one rewritten on disk is reloaded)."""
        return bool(self._failed or self.active)

    def refresh(self, registry: list[dict[str, Any]]) -> None:
        """Load new or changed transcoders, drop the ones no longer registered or active. An entry
        that cannot be loaded is skipped with its reason (in ``broken``) until it changes; it never
        stops the monitor or the other transcoders."""
        wanted = {
            t["name"]: t for t in registry if isinstance(t.get("name"), str) and t.get("active", True) and not t.get("broken")
        }
        for name in list(self.active):
            if name not in wanted:
                del self.active[name]
                log.info("stopped encoding with %s", name)
        for name, info in wanted.items():
            have = self.active.get(name)
            stamp = _stamp(info.get("path"))
            if have is not None and have[0].get("created") == info.get("created") and self._stamps.get(name) == stamp:
                continue
            if have is not None:  # its files were rewritten: what it encodes must be what is on disk
                del self.active[name]
                log.info("transcoder %s changed on disk: loading it again", name)
            attempt = (name, info.get("created"), stamp)
            if attempt in self._failed:  # tried again when the entry or its files change
                continue
            try:
                for field in ("path", "source", "run"):
                    if not isinstance(info.get(field), str):
                        raise ArtifactError(f"registry entry has no {field}")
                model, _ = load_artifact(info["path"])
            except Exception as e:  # an artifact of any shape must cost only itself
                self._failed.add(attempt)
                self.broken[name] = str(e)[:300]
                log.warning("cannot load transcoder %s from %s: %s", name, info.get("path"), e)
                continue
            self.broken.pop(name, None)
            self.active[name] = (info, model)
            self._stamps[name] = stamp
            log.info("encoding %s of run %s with %s (%d latents)", info["source"], info["run"], name, model.d_sae)

    @torch.no_grad()
    def encode(self, run: str, tap: str, data: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """(latent tap, latents [rows, d_sae]) for every transcoder that reads this tap of this run."""
        out = []
        x = None
        for name, (info, model) in self.active.items():
            if info["source"] != tap or info["run"] not in (run, "*"):
                continue
            if model.d_in != data.shape[1]:  # counted where a user looks (the health key), said once
                n = self.width_skipped[name] = self.width_skipped.get(name, 0) + 1
                self.broken[name] = (
                    f"reads {model.d_in} channels, but {run}/{tap} streams {data.shape[1]} ({n} frames not encoded)"
                )
                if n == 1:
                    log.warning("transcoder %s: %s", name, self.broken[name])
                continue
            if x is None:
                x = torch.from_numpy(
                    data if data.dtype == np.float32 and data.flags.c_contiguous else np.ascontiguousarray(data, dtype=np.float32)
                )
            out.append((LATENT_PREFIX + name, model.encode(x).numpy()))
        return out
