"""`interlatent train`, `transcoders`, `import` and `judge` on a recording of a real CartPole policy."""

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

from monitor.store.recording import Recorder, Recording
from monitor.store.records import Store
from monitor.tools.demo import DEMO_TAPS, make_ppo
from monitor.transcoders.artifacts import load_artifact, save_artifact
from monitor.transcoders.model import TrainConfig, quality, train_transcoder
from monitor.transcoders.training import undertrained


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


def test_undertrained_when_all_epochs_ran_and_the_last_tenth_still_improved() -> None:
    falling = [1.0 / (1 + e) for e in range(50)]  # the last 5 epochs beat the best before by ~9%
    assert undertrained(falling, epochs=50)
    assert not undertrained(falling[:40], epochs=50)  # early stopping ended it: it had converged
    assert not undertrained(falling[:45] + [falling[44]] * 5, epochs=50)  # flat at the end
    assert not undertrained([1.0] * 45 + [0.995] * 5, epochs=50)  # 0.5% better: within noise
    assert undertrained([1.0] * 45 + [0.98] * 5, epochs=50)  # 2% better
    assert not undertrained(falling[:45] + [0.5] * 5, epochs=50)  # worse at the end: overfitting, not undertrained
    assert undertrained([2.0, 1.0], epochs=2) and not undertrained([1.0], epochs=1)


def test_train_warns_when_the_validation_loss_still_falls(tmp_path: Path, redis_url: str, store: Store) -> None:
    folder = _record_policy(tmp_path / "rec", steps=600)
    base = ("train", "--run", "pol", "--source", DEMO_TAPS[0], "--target", DEMO_TAPS[1], "--latents", "2")
    r = _cli(*base, "--epochs", "4", "--recording", str(folder), "--json", redis_url=redis_url, data_dir=tmp_path)
    assert r.returncode == 0, r.stderr
    (t,) = json.loads(r.stdout)["transcoders"]
    assert t["epochs_run"] == 4 and t["undertrained"] is True and "--epochs 16" in t["hint"]
    assert "WARNING" in r.stderr and f"undertrained: {t['name']}" in r.stderr
    assert store.transcoders()[0]["undertrained"] is True
    r = _cli(*base, "--epochs", "4", "--recording", str(folder), redis_url=redis_url, data_dir=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"warning: {t['name']} is undertrained: " in r.stdout and "--epochs 16" in r.stdout


def test_judge_an_imported_transcoder_and_store_its_figures(tmp_path: Path, redis_url: str, store: Store) -> None:
    folder = _record_policy(tmp_path / "rec", steps=600)
    src, tgt = Recording(folder).pair(DEMO_TAPS[0], DEMO_TAPS[1])
    model, _ = train_transcoder(src, tgt, TrainConfig(d_sae=4, epochs=5), progress=False)
    art = save_artifact(tmp_path / "made-elsewhere", model, source=DEMO_TAPS[0], target=DEMO_TAPS[1])
    want = quality(model, src, tgt)  # judged on every recorded row, not a held-out part
    r = _cli(
        "import", str(art), "--run", "pol", "--source", DEMO_TAPS[0], "--target", DEMO_TAPS[1], "--name", "mine",
        redis_url=redis_url, data_dir=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert store.transcoders()[0]["quality"] is None  # no finished `interlatent record` of pol to judge it on
    r = _cli(
        "judge", "mine", "--run", "pol", "--recording", str(folder), "--agent", "agents.cartpole_factory:make",
        "--eval-episodes", "2", "--json", redis_url=redis_url, data_dir=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    q = json.loads(r.stdout)["quality"]
    assert q["rows"] == 600 and q["episodes"] == 2 and q["return_clean"] > 0 and "return_recovered" in q
    for k in ("mse", "fvu", "l0", "dead_frac", "dense_frac"):
        assert abs(q[k] - want[k]) <= 1e-6 * max(1.0, abs(want[k])), k
    (held,) = store.transcoders()
    assert held["quality"] == q and held["imported"] is True and held["judged"]["recording"] == str(folder.resolve())
    r = _cli("transcoders", redis_url=redis_url, data_dir=tmp_path)
    assert f"{want['fvu']:7.4f}" in r.stdout
    r = _cli("judge", "mine", "--run", "pol", "--recording", str(folder), redis_url=redis_url, data_dir=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "judged mine on 600 rows of run pol" in r.stdout and f"{want['fvu']:7.4f}" in r.stdout
    assert "episodes" not in store.transcoders()[0]["quality"]  # the figures of this judgement only

    def refused(*args: str) -> str:
        r = _cli("judge", *args, redis_url=redis_url, data_dir=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        return r.stderr.strip()

    assert refused("nope", "--run", "pol") == "interlatent: no transcoder 'nope'; registered: mine"
    assert "interlatent record --run nobody" in refused("mine", "--run", "nobody")
    # the same 4 -> 64 weights registered as reading the 64-wide hidden layer
    r = _cli(
        "import", str(art), "--run", "pol", "--source", DEMO_TAPS[1], "--target", DEMO_TAPS[1], "--name", "wide",
        redis_url=redis_url, data_dir=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    msg = refused("wide", "--run", "pol", "--recording", str(folder))
    assert f"tap '{DEMO_TAPS[1]}' is 64 wide" in msg and "d_in is 4" in msg
    (tmp_path / "empty").mkdir()
    store.register_transcoder({**held, "name": "gone", "path": str(tmp_path / "empty")})
    assert "has no *.safetensors weights" in refused("gone", "--run", "pol", "--recording", str(folder))
