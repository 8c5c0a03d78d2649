"""Auto-train: after a warm-up of ``steps`` steps, train transcoders for configured tap pairs.

For each run that streams a configured source tap and has no transcoder for the pair yet, the
monitor asks for a recording of the next ``steps`` steps. When it is done, ``interlatent train``
runs in a child process for each configured pair that still has no transcoder, one pair after
another (training never stalls the receive loop, and one child per run keeps the cores for the
agent); each registers its transcoders, and the monitor starts encoding with them between two
frames. A pair whose training fails is logged with its exit code and the next one starts.
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
        self.todo: dict[str, tuple[str, list[tuple[str, str]]]] = {}  # run -> (recording, pairs not started yet)
        self.jobs: dict[str, tuple[tuple[str, str], subprocess.Popen]] = {}  # run -> the pair training now

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
            if req.get("auto") and req.get("state") == "done" and run not in self.todo and not req.get("trained"):
                self.store.set_record(run, {**req, "trained": True})
                self.todo[run] = (req["path"], list(self.cfg.pairs))
        for run, ((src, tgt), job) in list(self.jobs.items()):
            rc = job.poll()
            if rc is not None:
                del self.jobs[run]
                (log.info if rc == 0 else log.warning)(
                    "auto-train of %s -> %s of run %r finished with exit code %d", src, tgt, run, rc
                )
        for run in list(self.todo):
            if run not in self.jobs:
                self._start_next(run)

    def _start_next(self, run: str) -> None:
        """Start training the run's next pair that has no transcoder yet; forget the run when none is left."""
        recording, pairs = self.todo[run]
        have = {(t["source"], t["target"]) for t in self.store.transcoders() if t["run"] == run}
        log_path = self.cfg.data_dir / "logs" / f"auto-train-{run.replace('/', '_')}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        while pairs:
            src, tgt = pairs.pop(0)
            if (src, tgt) in have:
                continue
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
            try:
                with open(log_path, "ab") as out:
                    self.jobs[run] = ((src, tgt), subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))
            except OSError as e:
                log.warning("auto-train: cannot start training %s -> %s of run %r: %s", src, tgt, run, e)
                continue
            log.info("auto-train: training %s -> %s of run %r (log %s)", src, tgt, run, log_path)
            return  # one pair at a time per run: the tick after it exits starts the next
        del self.todo[run]

    def close(self) -> None:
        for _, job in self.jobs.values():
            job.terminate()
        self.todo.clear()
