"""`interlatent train`, `transcoders` and `import` on a recording of a real CartPole policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from helpers import ROOT

from monitor.store.recording import Recorder
from monitor.store.records import Store
from monitor.tools.demo import DEMO_TAPS, make_ppo
from monitor.transcoders.artifacts import load_artifact


def _record_policy(folder: Path, steps: int = 1200) -> Path:
    """Hooks of the test's own (plain torch) on a real SB3 policy, written with the Recorder."""
    model = make_ppo(seed=3)
    net = model.policy.mlp_extractor.policy_net
    got: dict[str, torch.Tensor] = {}
    h1 = net[0].register_forward_pre_hook(lambda m, a: got.__setitem__(DEMO_TAPS[0], a[0].detach().clone()))
    h2 = net[1].register_forward_hook(lambda m, a, o: got.__setitem__(DEMO_TAPS[1], o.detach().clone()))
    rec = Recorder(folder, "pol", max_steps=steps)
    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=0)
    for step in range(steps):
        action, _ = model.predict(obs, deterministic=False)
        pos = np.array([[step, 0]])
        for tap, t in got.items():
            rec.add_tap(tap, t.numpy(), pos)
        rec.add_metrics(["reward"], np.array([[1.0]]), pos)
        obs, _, term, trunc, _ = env.step(action)
        if term or trunc:
            obs, _ = env.reset()
    h1.remove()
    h2.remove()
    return rec.close()


def _cli(*args: str, redis_url: str, data_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    return subprocess.run(
        [sys.executable, "-m", "monitor", *args, "--redis", redis_url, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=600,
        env=env,
    )


def test_train_sizes_register_and_list(tmp_path: Path, redis_url: str, store: Store) -> None:
    folder = _record_policy(tmp_path / "rec")
    r = _cli(
        "train",
        "--run",
        "pol",
        "--source",
        DEMO_TAPS[0],
        "--target",
        DEMO_TAPS[1],
        "--latents",
        "2,4,8",
        "--epochs",
        "15",
        "--l1",
        "1e-5",
        "--recording",
        str(folder),
        "--agent",
        "agents.cartpole_factory:make",
        "--eval-episodes",
        "3",
        "--json",
        redis_url=redis_url,
        data_dir=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    infos = json.loads(r.stdout)["transcoders"]
    assert [t["d_sae"] for t in infos] == [2, 4, 8]
    for t in infos:
        q = t["quality"]
        assert 0 <= q["fvu"] < 1 and q["l0"] <= t["d_sae"] and 0 <= q["dead_frac"] <= 1
        assert q["episodes"] == 3 and q["return_clean"] > 0 and "return_recovered" in q
        model, cfg = load_artifact(t["path"])
        assert (model.d_in, model.d_sae, model.d_out) == (4, t["d_sae"], 64) and cfg["metadata"]["source"] == DEMO_TAPS[0]
    assert infos[2]["quality"]["fvu"] < infos[0]["quality"]["fvu"]  # more latents explain more
    listed = json.loads(_cli("transcoders", "--json", redis_url=redis_url, data_dir=tmp_path).stdout)["transcoders"]
    assert [t["name"] for t in listed] == [t["name"] for t in infos]
    r = _cli(
        "inspect",
        "--run",
        "pol",
        "--transcoder",
        infos[1]["name"],
        "--recording",
        str(folder),
        "--json",
        redis_url=redis_url,
        data_dir=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    ins = json.loads(r.stdout)
    assert ins["rows"] == 1200 and len(ins["latents"]) == 4 and ins["metrics"] == ["reward"]
    lat = max(ins["latents"], key=lambda la: la["max"] or 0)
    assert lat["top"] and lat["top"][0]["value"] == lat["max"] and lat["top"][0]["metrics"] == {"reward": 1.0}
    r = _cli("report", "--run", "pol", "--out", str(tmp_path / "rep"), redis_url=redis_url, data_dir=tmp_path)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| 2 |" in md and "| 8 |" in md and "recovered" in md
    assert (tmp_path / "rep" / "multiscale.png").read_bytes()[:4] == b"\x89PNG"
    # an artifact made elsewhere, registered by path
    r = _cli(
        "import",
        infos[1]["path"],
        "--run",
        "other",
        "--source",
        DEMO_TAPS[0],
        "--target",
        DEMO_TAPS[1],
        "--name",
        "mine",
        redis_url=redis_url,
        data_dir=tmp_path,
    )
    assert r.returncode == 0 and "registered mine" in r.stdout
    assert "mine" in {t["name"] for t in store.transcoders()}


def test_train_without_a_recording_says_what_to_do(tmp_path: Path, redis_url: str, store: Store) -> None:
    r = _cli("train", "--run", "nobody", "--source", "a:in", "--target", "a:out", redis_url=redis_url, data_dir=tmp_path)
    assert r.returncode == 2 and "interlatent record --run nobody" in r.stderr and "Traceback" not in r.stderr
    r = _cli("import", str(tmp_path), "--run", "x", "--source", "a", "--target", "b", redis_url=redis_url, data_dir=tmp_path)
    assert r.returncode == 2 and "safetensors" in r.stderr
