"""examples/halfcheetah_live.py for a few hundred steps: a briefly trained SAC policy on MuJoCo's
HalfCheetah streams into the services, the monitor auto-trains a transcoder on its actor, encodes
the latents live, the explainer labels them, and the "what the agent is thinking" strip names the
active ones. Skipped, saying why, where MuJoCo is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

SCRIPT = ROOT / "examples" / "halfcheetah_live.py"


def _mujoco_missing() -> str | None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from halfcheetah_live import missing_mujoco
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return missing_mujoco()


@pytest.mark.timeout(300)
def test_halfcheetah_streams_through_the_whole_pipeline(tmp_path: Path) -> None:
    why = _mujoco_missing()
    if why:
        pytest.skip(why)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), OMP_NUM_THREADS="1"
    )
    args = ["--train-steps", "300", "--steps", "400", "--warmup-steps", "200", "--latents", "4", "--data-dir", str(tmp_path)]
    r = subprocess.run(  # in tmp_path: MuJoCo writes its MUJOCO_LOG.TXT where it runs
        [sys.executable, str(SCRIPT), *args, "--json"], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=280
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["steps"] >= 400 and got["transcoder"] and got["latent_tap"] == f"latents:{got['transcoder']}"
    assert [x["latent"] for x in got["latents"]] == [0, 1, 2, 3]
    assert got["latents"][0]["label"], "latent 0 explained (the script streams until it is)"
    for f in got["thinking"]:  # the strip: latents above 0 at the newest step, most unusual first
        assert f["value"] > 0 and 0 <= f["latent"] < 4
    assert [f["z"] for f in got["thinking"]] == sorted((f["z"] for f in got["thinking"]), reverse=True)
    assert (tmp_path / "examples" / "sac_halfcheetah.safetensors").exists()  # trained once, cached without pickle
    assert not list(tmp_path.rglob("*.zip")) and not list(tmp_path.rglob("*.pkl"))


def test_halfcheetah_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "0", "--data-dir", str(tmp_path)],
        cwd=str(ROOT),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "at least 1" in r.stderr
