"""Auto-train: after a warm-up of ``steps`` steps, train transcoders for configured tap pairs.

For each run that streams a configured source tap and has no transcoder for the pair yet, the
monitor asks for a recording of the next ``steps`` steps. When it is done, ``interlatent train``
runs in a child process (training never stalls the receive loop), registers its transcoders,
and the monitor starts encoding with them between two frames.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from monitor.store.records import Store

__all__ = ["AutoTrain", "AutoTrainer", "parse_pairs"]

log = logging.getLogger(__name__)


def parse_pairs(spec: str) -> list[tuple[str, str]]:
    """``"a:in>b:out,c:out>c:out"`` -> [("a:in", "b:out"), ("c:out", "c:out")]."""
    pairs = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        src, sep, tgt = part.partition(">")
        if not sep or not src or not tgt:
            raise ValueError(f"--auto-train takes SOURCE>TARGET pairs separated by commas, got {part!r}")
        pairs.append((src.strip(), tgt.strip()))
    return pairs


@dataclass(frozen=True)
class AutoTrain:
    pairs: tuple[tuple[str, str], ...]
    redis_url: str
    data_dir: Path
    steps: int = 2000
    latents: str = "4"
    epochs: int = 30


class AutoTrainer:
    def __init__(self, cfg: AutoTrain, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self.started: set[str] = set()  # runs whose warm-up recording was asked for
        self.jobs: dict[str, subprocess.Popen] = {}

    def tick(self, runs: dict[str, set[str]]) -> None:
        """Called at each flush with every run's taps: ask, train, reap."""
        for run, taps in runs.items():
            if run in self.started or not any(src in taps for src, _ in self.cfg.pairs):
                continue
            have = {(t["source"], t["target"]) for t in self.store.transcoders() if t["run"] == run}
            if all(p in have for p in self.cfg.pairs):
                self.started.add(run)
                continue
            self.started.add(run)
            self.store.set_record(run, {"steps": self.cfg.steps, "state": "requested", "auto": True})
            log.info("auto-train: recording %d warm-up steps of run %r", self.cfg.steps, run)
        for run, req in self.store.record_requests().items():
            if req.get("auto") and req.get("state") == "done" and run not in self.jobs and not req.get("trained"):
                self.store.set_record(run, {**req, "trained": True})
                self._train(run, req["path"])
        for run, job in list(self.jobs.items()):
            rc = job.poll()
            if rc is not None:
                del self.jobs[run]
                (log.info if rc == 0 else log.warning)("auto-train of run %r finished with exit code %d", run, rc)

    def _train(self, run: str, recording: str) -> None:
        log_path = self.cfg.data_dir / "logs" / f"auto-train-{run.replace('/', '_')}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        for src, tgt in self.cfg.pairs:
            cmd = [
                sys.executable,
                "-m",
                "monitor",
                "train",
                "--run",
                run,
                "--source",
                src,
                "--target",
                tgt,
                "--latents",
                self.cfg.latents,
                "--epochs",
                str(self.cfg.epochs),
                "--recording",
                recording,
                "--redis",
                self.cfg.redis_url,
                "--data-dir",
                str(self.cfg.data_dir),
                "--json",
            ]
            with open(log_path, "ab") as out:
                self.jobs[run] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
            log.info("auto-train: training %s -> %s of run %r (log %s)", src, tgt, run, log_path)
            break  # one pair at a time per run; the next tick starts nothing new until it finishes

    def close(self) -> None:
        for job in self.jobs.values():
            job.terminate()
