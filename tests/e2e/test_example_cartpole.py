"""examples/cartpole_transcoders.py end to end on tiny budgets: the report's sections and tables,
results.json's shape, and sweep cells whose failure counts add up."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

SCRIPT = ROOT / "examples" / "cartpole_transcoders.py"
SIZES = (2, 4, 8)
ALPHAS = (1.0, -1.0, 2.5, -2.5)
EPISODES = 2
MODES = ("pole_left", "pole_right", "cart_out", "survived")


def _table(md: str, heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the first markdown table after ``heading``."""
    section = md.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # past the header and the |---| line


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("cartpole")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--no-progress", "--episodes", str(EPISODES)],
        cwd=str(ROOT),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.timeout(150)
def test_report_has_every_section_and_table(run: tuple[Path, str]) -> None:
    out, stdout = run
    md = (out / "report.md").read_text()
    for heading in (
        "## Policy",
        "## Transcoder quality",
        "## Features of the 4-latent transcoders",
        "## Interventions: layer1 (`fc1:out`)",
        "## Interventions: layer2 (`fc2:out`)",
        "## Against the seed post",
        "## Timing",
    ):
        assert heading in md, heading
    assert "did NOT reach the criterion" in md and "WARNING" in stdout  # 20 episodes cannot solve CartPole; the report says so

    quality = _table(md, "## Transcoder quality")
    assert sorted((r[0], int(r[2])) for r in quality) == sorted((f"layer{i}", s) for i in (1, 2) for s in SIZES)
    features = _table(md, "## Features of the 4-latent transcoders")
    assert sorted((r[0], int(r[1])) for r in features) == [(f"layer{i}", j) for i in (1, 2) for j in range(4)]
    for layer in ("layer1", "layer2"):
        sweep_rows = _table(md, f"## Interventions: {layer}")
        assert [(int(r[0]), float(r[1])) for r in sweep_rows] == [(j, a) for j in range(4) for a in ALPHAS]
        for r in sweep_rows:  # "baseline -> intervened" failure counts, each side summing to the episodes
            pairs = [re.fullmatch(r"(\d+) → (\d+)", c) for c in r[-len(MODES) :]]
            assert all(pairs), r
            assert sum(int(p[1]) for p in pairs) == sum(int(p[2]) for p in pairs) == EPISODES
    seed = _table(md, "## Against the seed post")
    figures = {r[0]: r for r in seed}
    assert "261.3" in figures["baseline avg return"][1] and "322.74" in figures["best nudge"][1]
    for name in ("sweep_layer1.png", "sweep_layer2.png", "multiscale/multiscale.png", "policy.safetensors"):
        assert (out / name).stat().st_size > 0, name


@pytest.mark.timeout(150)
def test_results_json_shape(run: tuple[Path, str]) -> None:
    out, _ = run
    res = json.loads((out / "results.json").read_text())
    assert {"config", "timing_s", "policy", "recording", "transcoders", "sweeps", "best_nudge", "seed_post"} <= set(res)
    assert res["policy"]["criterion_met"] is False and res["policy"]["episodes"] == res["config"]["max_train_episodes"]
    got = sorted((t["layer"], t["d_sae"]) for t in res["transcoders"])
    assert got == sorted((f"layer{i}", s) for i in (1, 2) for s in SIZES)
    for t in res["transcoders"]:
        assert {"l0", "fvu", "dead_frac", "return_recovered", "return_spliced"} <= set(t["quality"])
        assert t["source"] == t["target"] == {"layer1": "fc1:out", "layer2": "fc2:out"}[t["layer"]]
        assert len(t["inspection"]["latents"]) == t["d_sae"]
        assert set(t["inspection"]["metrics"]) == {"cart_pos", "cart_vel", "pole_angle", "angle_vel"}
    assert set(res["sweeps"]) == {"layer1", "layer2"}
    for s in res["sweeps"].values():
        assert s["d_sae"] == 4 and s["episodes"] == EPISODES and list(s["modes"]) == list(MODES)
        assert len(s["cells"]) == 4 * len(ALPHAS)
        for c in [s["baseline"], *s["cells"]]:
            assert sum(c["failures"].values()) == c["n"] == len(c["returns"]) == EPISODES
    best = res["best_nudge"]
    assert best["mean"] == max(c["mean"] for s in res["sweeps"].values() for c in s["cells"])
    assert best["tests"] == 2 * 4 * len(ALPHAS)
