"""Recordings: what a monitor received, on disk, readable with numpy alone.

Layout of ``DIR`` (one run)::

    manifest.json                       # taps, widths, metric names, shards with rows and sha256
    taps/<n>/data-00000.npy, pos-00000.npy  # tap n (its name is in the manifest)
    metrics/data-00000.npy, pos-00000.npy   # metric columns named in the manifest (the first set of names)
    metrics-1/...                       # another set (tap.log()'s beside the env wrapper's): joined on read

``pos`` rows are (step, index), so a tap's rows pair with the metric rows of the same step.
A shard is written to a temporary name, renamed, then listed in the manifest (also replaced
atomically): a crash leaves at most an unlisted file, which is ignored. A listed shard whose
size or checksum is wrong is refused with :class:`RecordingError`, never read as data.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Recorder", "Recording", "RecordingError"]

SHARD_ROWS = 16384
MAX_METRIC_GROUPS = 16  # sets of metric names recorded per run


class RecordingError(RuntimeError):
    """A recording that is missing, incomplete or corrupt; the message says which file."""


def _save(path: Path, arr: np.ndarray) -> str:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(arr))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class _Stream:
    folder: str
    width: int
    dtype: str
    data: list[np.ndarray]
    pos: list[np.ndarray]
    rows: int = 0
    shards: list[dict[str, Any]] = field(default_factory=list)


class Recorder:
    """Append a run's tap rows and metric rows; bounded by ``max_steps`` (distinct steps seen)."""

    def __init__(self, directory: Path | str, run: str, *, max_steps: int, shard_rows: int = SHARD_ROWS) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run = run
        self.max_steps = max_steps
        self.shard_rows = shard_rows
        self.taps: dict[str, _Stream] = {}
        self.metrics: _Stream | None = None
        self.metric_names: list[str] = []
        self.metric_groups: dict[tuple[str, ...], _Stream] = {}
        self.metric_rows_dropped = 0  # rows of sets of names past MAX_METRIC_GROUPS
        self.first_step: int | None = None
        self.last_step = -1
        self.metrics_last_step = -1  # metric frames trail the tap frames of their steps
        self.full_since: float | None = None
        self.done = False

    @property
    def steps(self) -> int:
        return 0 if self.first_step is None else self.last_step - self.first_step + 1

    def _take(self, pos: np.ndarray, *, may_start: bool) -> np.ndarray:
        """Rows within the step budget, which counts from the first tap row recorded: a tap's
        rows arrive before that step's metrics, so starting on a metric frame would record
        metrics whose activations came before the recorder existed."""
        if self.first_step is None:
            if not may_start:
                return np.zeros(len(pos), dtype=bool)
            self.first_step = int(pos[0, 0])
        keep = (pos[:, 0] >= self.first_step) & (pos[:, 0] < self.first_step + self.max_steps)
        if keep.any():
            self.last_step = max(self.last_step, int(pos[keep, 0].max()))
        return keep

    def add_tap(self, tap: str, data: np.ndarray, pos: np.ndarray) -> None:
        if self.done:
            return
        keep = self._take(pos, may_start=True)
        s = self.taps.get(tap)
        if s is None:
            s = self.taps[tap] = _Stream(f"taps/{len(self.taps)}", data.shape[1], data.dtype.name, [], [], 0, [])
        if data.shape[1] != s.width:
            return  # the monitor rejects such frames before they get here
        self._append(s, data[keep], pos[keep])

    def add_metrics(self, names: list[str], data: np.ndarray, pos: np.ndarray) -> None:
        """Metric rows of one set of names (the env wrapper's, ``tap.log()``'s): each set is a
        stream of its own, joined by (step, index) when read."""
        if self.done:
            return
        key = tuple(names)
        s = self.metric_groups.get(key)
        if s is None:
            if len(self.metric_groups) >= MAX_METRIC_GROUPS:
                self.metric_rows_dropped += len(data)
                return
            folder = "metrics" if not self.metric_groups else f"metrics-{len(self.metric_groups)}"
            s = self.metric_groups[key] = _Stream(folder, len(names), "float64", [], [], 0, [])
            if self.metrics is None:  # the first set is also the manifest's "metrics", for older readers
                self.metric_names, self.metrics = list(names), s
        keep = self._take(pos, may_start=False)
        if keep.any():
            self.metrics_last_step = max(self.metrics_last_step, int(pos[keep, 0].max()))
        self._append(s, data[keep], pos[keep])

    def _append(self, s: _Stream, data: np.ndarray, pos: np.ndarray) -> None:
        if len(data):
            s.data.append(np.array(data))
            s.pos.append(np.array(pos))
            s.rows += len(data)
            if sum(len(d) for d in s.data) >= self.shard_rows:
                self._write_shard(s)

    def _write_shard(self, s: _Stream) -> None:
        if not s.data:
            return
        folder = self.dir / s.folder
        folder.mkdir(parents=True, exist_ok=True)
        i = len(s.shards)
        data, pos = np.concatenate(s.data), np.concatenate(s.pos)
        entry: dict[str, Any] = {"data": f"{s.folder}/data-{i:05d}.npy", "pos": f"{s.folder}/pos-{i:05d}.npy", "rows": len(data)}
        entry["data_sha256"] = _save(self.dir / entry["data"], data)
        entry["pos_sha256"] = _save(self.dir / entry["pos"], pos)
        s.shards.append(entry)
        s.data, s.pos = [], []
        self._write_manifest(complete=False)

    def _write_manifest(self, *, complete: bool) -> None:
        doc = {
            "format": "interlatent-recording/1",
            "run": self.run,
            "complete": complete,
            "steps": self.steps,
            "first_step": self.first_step,
            "max_steps": self.max_steps,
            "taps": {
                t: {
                    "folder": s.folder,
                    "width": s.width,
                    "dtype": s.dtype,
                    "rows": sum(e["rows"] for e in s.shards),
                    "shards": s.shards,
                }
                for t, s in self.taps.items()
            },
            "metrics": None
            if self.metrics is None
            else {"names": self.metric_names, "rows": sum(e["rows"] for e in self.metrics.shards), "shards": self.metrics.shards},
            "metric_groups": [
                {"names": list(names), "folder": g.folder, "rows": sum(e["rows"] for e in g.shards), "shards": g.shards}
                for names, g in self.metric_groups.items()
            ],
            "metric_rows_dropped": self.metric_rows_dropped,
        }
        tmp = self.dir / "manifest.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.dir / "manifest.json")

    @property
    def full(self) -> bool:
        return self.steps >= self.max_steps

    def finished(self, now_s: float, *, metrics_expected: bool = True, grace_s: float = 5.0) -> bool:
        """Full, and the metric rows of the last step are in too (they come in frames of their own,
        after the activations); without them, ``grace_s`` after the taps filled up."""
        if not self.full:
            return False
        if not metrics_expected or self.metrics_last_step >= self.last_step:
            return True
        if self.full_since is None:
            self.full_since = now_s
        return now_s - self.full_since >= grace_s

    def close(self) -> Path:
        """Write what is buffered and mark the recording complete; returns its directory."""
        if not self.done:
            for s in [*self.taps.values(), *self.metric_groups.values()]:
                self._write_shard(s)
            self._write_manifest(complete=True)
            self.done = True
        return self.dir


class Recording:
    """A recording on disk. ``tap(name)`` and ``metrics()`` return (data, pos); ``paired(tap)``
    returns the tap's rows with the metric rows of the same (step, index)."""

    def __init__(self, directory: Path | str) -> None:
        self.dir = Path(directory)
        try:
            self.manifest = json.loads((self.dir / "manifest.json").read_text())
        except FileNotFoundError as e:
            raise RecordingError(f"no recording at {self.dir} (manifest.json is missing)") from e
        except json.JSONDecodeError as e:
            raise RecordingError(f"{self.dir / 'manifest.json'} is not valid JSON") from e

    @property
    def taps(self) -> list[str]:
        return list(self.manifest["taps"])

    @property
    def metric_names(self) -> list[str]:
        """Every metric recorded, whichever set of names it came in."""
        groups = self.manifest.get("metric_groups")
        if groups:
            return list(dict.fromkeys(n for g in groups for n in g["names"]))
        return self.manifest["metrics"]["names"] if self.manifest.get("metrics") else []

    def _load(self, shards: list[dict[str, Any]], width: int) -> tuple[np.ndarray, np.ndarray]:
        data, pos = [], []
        for e in shards:
            for key in ("data", "pos"):
                path = self.dir / e[key]
                if not path.exists():
                    raise RecordingError(f"shard {path} is listed in the manifest but missing")
                if hashlib.sha256(path.read_bytes()).hexdigest() != e[f"{key}_sha256"]:
                    raise RecordingError(f"shard {path} is damaged (checksum mismatch; cut short by a crash?)")
            d = np.load(self.dir / e["data"], allow_pickle=False)
            p = np.load(self.dir / e["pos"], allow_pickle=False)
            if d.shape != (e["rows"], width) or p.shape != (e["rows"], 2):
                raise RecordingError(f"shard {self.dir / e['data']} has shape {d.shape}, the manifest says {(e['rows'], width)}")
            data.append(d)
            pos.append(p)
        if not data:
            return np.zeros((0, width)), np.zeros((0, 2), dtype=np.int64)
        return np.concatenate(data), np.concatenate(pos)

    def tap(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.manifest["taps"]:
            raise RecordingError(f"tap {name!r} is not in the recording at {self.dir}; it has {', '.join(self.taps)}")
        t = self.manifest["taps"][name]
        return self._load(t["shards"], t["width"])

    def metrics(self) -> tuple[np.ndarray, np.ndarray]:
        """(data [rows, metric_names], pos). Several sets of names are joined by (step, index),
        NaN where a set has no row."""
        from monitor.stats.analytics import key_of, pos_of_keys

        groups = self.manifest.get("metric_groups") or ([self.manifest["metrics"]] if self.manifest.get("metrics") else [])
        if not groups:
            return np.zeros((0, 0)), np.zeros((0, 2), dtype=np.int64)
        if len(groups) == 1:
            return self._load(groups[0]["shards"], len(groups[0]["names"]))
        names = self.metric_names
        loaded = [(g["names"], *self._load(g["shards"], len(g["names"]))) for g in groups]
        keys = np.unique(np.concatenate([key_of(p) for _, _, p in loaded]))
        out = np.full((len(keys), len(names)), np.nan)
        for group_names, data, pos in loaded:
            rows = np.searchsorted(keys, key_of(pos))
            cols = np.array([names.index(n) for n in group_names], dtype=np.int64)
            out[np.ix_(rows, cols)] = data
        return out, pos_of_keys(keys)

    def paired(self, *taps: str) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Rows of every tap in ``taps`` and the metric rows, at the (step, index) all of them have;
        returns ([rows per tap], metrics, pos)."""
        from monitor.stats.analytics import key_of, pos_of_keys

        streams = [self.tap(t) for t in taps] + [self.metrics()]
        keys = [key_of(p) for _, p in streams]
        common = keys[0]
        for k in keys[1:]:
            common = np.intersect1d(common, k)
        picked = []
        for (d, _), k in zip(streams, keys, strict=True):
            uniq, first = np.unique(k, return_index=True)
            picked.append(d[first[np.searchsorted(uniq, common)]])
        return picked[:-1], picked[-1], pos_of_keys(common)

    def pair(self, source: str, target: str) -> tuple[np.ndarray, np.ndarray]:
        """(source rows, target rows) of the same steps: a transcoder's training data (an SAE's
        when source == target)."""
        if source == target:
            (rows,), _, _ = self.paired(source)
            return rows, rows
        (src, tgt), _, _ = self.paired(source, target)
        return src, tgt
