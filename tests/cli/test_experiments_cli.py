"""`interlatent sweep`, `probe` and `compare` from the command line, on a real SB3 CartPole policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT

from monitor.experiments.failure_modes import CARTPOLE_MODES
from monitor.store.records import Store
from monitor.tools.demo import DEMO_TAPS
from monitor.transcoders.artifacts import save_artifact
from monitor.transcoders.model import Transcoder
from monitor.transcoders.training import artifact_info

POLICY = "agents.cartpole_factory:make"
HIDDEN = DEMO_TAPS[1]  # mlp_extractor.policy_net.1:out, 64 wide


def _cli(*args: str, redis_url: str, data_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "monitor", *args, "--redis", redis_url, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=600,
        env=env,
    )


def _planted(tmp_path: Path, store: Store, name: str, *, seed: int) -> Transcoder:
    """A 64→3→64 transcoder on the policy's hidden layer, registered under ``name``."""
    torch.manual_seed(seed)
    tc = Transcoder(64, 3, 64).eval()
    path = save_artifact(tmp_path / name, tc, source=HIDDEN, target=HIDDEN, run="pol")
    store.register_transcoder(artifact_info(name, path, tc, run="pol", source=HIDDEN, target=HIDDEN, q=None))
    return tc


@pytest.mark.timeout(300)
def test_sweep_json_has_every_cell_with_ci_and_failure_modes(tmp_path: Path, redis_url: str, store: Store) -> None:
    _planted(tmp_path, store, "tc", seed=0)
    r = _cli(
        "sweep",
        "--policy",
        POLICY,
        "--transcoder",
        "tc",
        "--latents",
        "0,1",
        "--alphas",
        "40,-40",
        "--episodes",
        "4",
        "--out",
        str(tmp_path / "out"),
        "--json",
        redis_url=redis_url,
        data_dir=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["tap"] == HIDDEN and res["transcoder"] == "tc" and res["episodes"] == 4
    cells = res["cells"]
    assert sorted((c["latent"], c["alpha"]) for c in cells) == [(0, -40.0), (0, 40.0), (1, -40.0), (1, 40.0)]
    for c in [res["baseline"], *cells]:
        assert sum(c["failures"].values()) == 4 and set(c["failures"]) <= set(CARTPOLE_MODES)
        lo, hi = c["ci"]
        assert lo <= c["mean"] <= hi
    # a decoder row 40x over is a huge push: at least one cell's returns differ from the baseline's
    assert any(c["returns"] != res["baseline"]["returns"] for c in cells)
    for f in ("sweep.md", "sweep.json", "sweep.png"):
        assert (tmp_path / "out" / f).stat().st_size > 100


def test_sweep_errors_are_one_line(tmp_path: Path, redis_url: str, store: Store) -> None:
    r = _cli("sweep", "--policy", POLICY, "--transcoder", "nope", redis_url=redis_url, data_dir=tmp_path)
    assert r.returncode == 2 and "no transcoder 'nope'" in r.stderr
    _planted(tmp_path, store, "tc", seed=0)
    r = _cli(
        "sweep",
        "--policy",
        POLICY,
        "--transcoder",
        "tc",
        "--tap",
        DEMO_TAPS[0],
        "--episodes",
        "1",
        redis_url=redis_url,
        data_dir=tmp_path,
    )
    assert r.returncode == 2 and "64 entries" in r.stderr and "Traceback" not in r.stderr  # a 64-wide row on a 4-wide tap
    r = _cli("sweep", "--policy", POLICY, "--transcoder", "tc", "--alphas", "1,x", redis_url=redis_url, data_dir=tmp_path)
    assert r.returncode == 2 and "--alphas" in r.stderr


@pytest.mark.timeout(300)
def test_probe_finds_the_observation_at_the_input_tap(tmp_path: Path, redis_url: str) -> None:
    r = _cli(
        "probe",
        "--policy",
        POLICY,
        "--tap",
        DEMO_TAPS[0],
        "--episodes",
        "6",
        "--kinds",
        "ridge,lasso",
        "--metric",
        "pole_angle",
        "--out",
        str(tmp_path / "p"),
        "--json",
        redis_url=redis_url,
        data_dir=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    r2 = {(p["metric"], p["kind"]): p["r2_test"] for p in res["probes"]}
    assert set(r2) == {(m, k) for m in ("cart_pos", "cart_vel", "pole_angle", "angle_vel") for k in ("ridge", "lasso")}
    assert min(r2.values()) > 0.99  # the input tap is the observation itself
    assert res["polarity_inversion"]["dropped"] and res["polarity_inversion"]["r2_inverted"] < 0
    assert {"return_clean", "return_ablated", "return_random"} <= set(res["ablation"])
    assert (tmp_path / "p" / "probes.png").stat().st_size > 1000


def test_compare_finds_a_transcoder_shares_its_latents_with_itself(tmp_path: Path, redis_url: str, store: Store) -> None:
    _planted(tmp_path, store, "a", seed=0)
    _planted(tmp_path, store, "b", seed=0)
    _planted(tmp_path, store, "c", seed=7)
    same = json.loads(_cli("compare", "a", "b", "--json", redis_url=redis_url, data_dir=tmp_path).stdout)
    assert len(same["shared"]) == 3 and not same["unique_a"] and all(p["cosine"] > 0.999 for p in same["pairs"])
    other = _cli("compare", "a", "c", redis_url=redis_url, data_dir=tmp_path)
    assert other.returncode == 0 and "unique" in other.stdout.lower()
