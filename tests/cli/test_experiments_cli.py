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
        "--random-directions",
        "3",
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
    assert res["folds"] == 5 and all(len(p["r2_test_folds"]) == 5 and p["r2_test_sd"] < 0.01 for p in res["probes"])
    assert len(res["returns"]) == 6 and res["return_mean"] == pytest.approx(sum(res["returns"]) / 6)
    inv = res["polarity_inversion"]
    assert inv["dropped"] and inv["r2_inverted"] < 0 and len(inv["normal"]["returns"]) == len(inv["inverted"]["returns"]) == 6
    assert {"mean", "ci", "p_value"} <= set(inv["diff"])
    abl = res["ablation"]
    assert {"return_clean", "return_ablated", "return_random"} <= set(abl)
    assert abl["modes"] == ["zero", "mean"] and abl["direction"] == "ridge probe of pole_angle"
    for cell in abl["ablations"].values():
        assert len(cell["returns"]) == 6 and cell["random"]["n"] == 3 and len(cell["diff"]["ci"]) == 2
    assert (tmp_path / "p" / "probes.png").stat().st_size > 1000
    assert json.loads((tmp_path / "p" / "probes.json").read_text())["probes"] == res["probes"]


def _main(capsys: pytest.CaptureFixture, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """The command in this process (the factories in tests/agents are importable here)."""
    from monitor.cli.main import main

    rc = main([*args, "--data-dir", str(tmp_path)])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.timeout(120)
def test_probe_and_sweep_start_an_lstm_policy_afresh_with_its_reset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    flags = ["--tap", "lstm:out", "--episodes", "3", "--kinds", "ridge", "--folds", "3", "--json"]
    more = ["--metric", "pole_angle", "--ablation", "zero", "--random-directions", "2"]
    rc, out, err = _main(capsys, tmp_path, "probe", "--policy", "agents.lstm_cartpole:make", *flags, *more)
    assert rc == 0, err
    res = json.loads(out)
    assert res["returns"] == [110.0, 110.0, 110.0]  # each episode from a zero state (tests/agents/lstm_cartpole.py)
    assert res["steps"] == 330 and res["folds"] == 3
    assert res["polarity_inversion"]["normal"]["returns"] == res["returns"]
    assert res["ablation"]["clean"]["returns"] == res["returns"] and res["ablation"]["modes"] == ["zero"]
    rc, out, err = _main(capsys, tmp_path, "probe", "--policy", "agents.lstm_cartpole:make_no_reset", *flags)
    assert rc == 0, err
    carried = json.loads(out)["returns"]
    assert carried[0] < 110.0 and max(carried[1:]) < 20.0  # the tap's check step, then each episode, spend the counter
    # sweep: a zero decoder row changes nothing, so every cell is the baseline, each episode from a zero state
    tc = Transcoder(3, 2, 3).eval()
    with torch.no_grad():
        tc.W_dec.zero_()
    art = str(save_artifact(tmp_path / "lstm-tc", tc, source="lstm:out", target="lstm:out", run="pol"))
    sweep = ["sweep", "--artifact", art, "--alphas", "1", "--episodes", "3", "--json"]
    rc, out, err = _main(capsys, tmp_path, *sweep, "--policy", "agents.lstm_cartpole:make")
    assert rc == 0, err
    res = json.loads(out)
    assert res["tap"] == "lstm:out" and res["baseline"]["returns"] == [110.0, 110.0, 110.0]
    assert all(c["returns"] == [110.0, 110.0, 110.0] for c in res["cells"])
    rc, out, err = _main(capsys, tmp_path, *sweep, "--policy", "agents.lstm_cartpole:make_no_reset")
    assert rc == 0, err
    assert max(json.loads(out)["baseline"]["returns"][1:]) < 20.0


@pytest.mark.timeout(120)
def test_probe_subspace_greedy_finds_the_quiet_direction(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    common = ["probe", "--policy", "agents.quiet_cartpole:make", "--tap", "2:in", "--episodes", "2", "--kinds", "ridge"]
    rc, out, err = _main(capsys, tmp_path, *common, "--subspace", "--json")
    assert rc == 0, err
    sub = json.loads(out)["subspace"]
    assert sub["k"] == 1 and sub["k_ci"] == [1, 1] and sub["components"] == [4] and sub["candidates"] == 5
    assert sub["variance_order"]["k"] == 5 and [k for k, _ in sub["variance_order"]["curve"]] == [1, 2, 3, 4, 5]
    rc, out, err = _main(
        capsys,
        tmp_path,
        *common,
        "--subspace",
        "--metric",
        "pole_angle",
        "--random-directions",
        "2",
        "--out",
        str(tmp_path / "o"),
    )
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("2:in: 1000 steps over 2 episodes, mean return 500.0 [500.0, 500.0]")
    assert lines[1] == "held-out R², mean ± sd over 5 folds of contiguous blocks of steps:"
    assert any(line.startswith("polarity inversion of pole_angle: R² ") for line in lines)
    assert any(line.startswith("  zero-ablation: return 500.0 -> ") and "random directions" in line for line in lines)
    assert any(line.startswith("  mean-ablation (held at its mean ") for line in lines)
    assert any(line.startswith("  greedy by return: k = 1 [1, 1], components [4]") for line in lines)
    assert any(line.startswith("  variance order:   k = 5 [5, 5]") for line in lines)
    assert (tmp_path / "o" / "subspace.png").stat().st_size > 1000


def _artifact(tmp_path: Path, d_in: int, d_out: int, tap: str) -> str:
    torch.manual_seed(0)
    return str(
        save_artifact(tmp_path / f"tc{d_in}x{d_out}", Transcoder(d_in, 3, d_out).eval(), source=tap, target=tap, run="pol")
    )


NEVER = "agents.bad_factories:acts_never"  # act raises: an error below that is not its own came before any step
EXPECTED_SHAPE = "must be a tuple (module, make_env, act) or (module, make_env, act, reset)"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--policy", "agents.bad_factories:raises"],
            "the factory agents.bad_factories:raises raised RuntimeError: no checkpoint",
        ),
        (["--policy", "agents.bad_factories:bare_module"], f"{EXPECTED_SHAPE}, got Linear"),
        (["--policy", "agents.bad_factories:pair"], f"{EXPECTED_SHAPE}, got a tuple of 2"),
        (["--policy", "agents.raises_on_import:make"], "KeyError: \"config key 'checkpoint' is missing\""),
        (["--policy", "agents.nope:make"], "No module named 'agents.nope'"),
        (["--policy", NEVER, "--tap", "2:in"], "--tap 2:in: no module named '2' in Sequential; close matches: 0, 1"),
        (["--policy", NEVER, "--tap", "0:inn"], "--tap 0:inn:"),
        (
            ["--policy", NEVER, "--metric", "pole_angel"],
            "--metric 'pole_angel' is not an observation component; did you mean pole_angle?",
        ),
        (["--policy", NEVER, "--kinds", "ridge,svm"], "--kinds: unknown ['svm']"),
        (["--policy", NEVER, "--ablation", "median"], "--ablation must be some of zero, mean"),
        (["--policy", NEVER, "--folds", "1"], "--folds must be at least 2, got 1"),
        (["--policy", NEVER, "--episodes", "0"], "--episodes must be at least 1, got 0"),
        (["--policy", NEVER, "--keep", "1.5"], "--keep must be in (0, 1]"),
        (["--policy", "agents.bad_factories:two_rows", "--tap", "0:out"], "gives 2 rows for one observation"),
    ],
)
def test_probe_bad_input_is_one_line_and_exit_2_before_any_step(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = {"--tap": "0:in"}
    flags = [*args, *(x for k, v in base.items() if k not in args for x in (k, v))]
    rc, out, err = _main(capsys, tmp_path, "probe", *flags)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("interlatent: ") and message in err, err


def test_sweep_bad_input_is_one_line_and_exit_2_before_any_episode(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    four = _artifact(tmp_path, 4, 4, "0:in")
    cases = [
        (["--policy", "agents.bad_factories:raises", "--artifact", four], "raised RuntimeError: no checkpoint"),
        (["--policy", NEVER, "--artifact", four, "--tap", "3:out"], "--tap 3:out: no module named '3'"),
        (["--policy", NEVER, "--artifact", four, "--latents", "0,x"], "--latents must be integers"),
        (["--policy", NEVER, "--artifact", four, "--latents", ","], "--latents must be integers"),
        (["--policy", NEVER, "--artifact", four, "--latents", "7"], "latents [7] out of range"),
        (["--policy", NEVER, "--artifact", four, "--episodes", "0"], "--episodes must be at least 1"),
        # a 64-wide decoder row on the 5-wide tap: found in one forward, before the baseline runs
        (["--policy", "agents.quiet_cartpole:make", "--artifact", _artifact(tmp_path, 5, 64, "2:in")], "64 entries"),
    ]
    for args, message in cases:
        rc, out, err = _main(capsys, tmp_path, "sweep", *args, "--json")
        assert rc == 2 and out == "", (args, out)
        assert err.count("\n") == 1 and err.startswith("interlatent: ") and message in err, (args, err)


def test_a_factory_that_raises_is_one_line_from_the_real_command(tmp_path: Path, redis_url: str) -> None:
    r = _cli("probe", "--policy", "agents.bad_factories:raises", "--tap", "0:in", redis_url=redis_url, data_dir=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "interlatent: cannot load --policy 'agents.bad_factories:raises': the factory agents.bad_factories:raises raised"
        " RuntimeError: no checkpoint at /nowhere/policy.pt (train one first)"
    ]


def test_compare_finds_a_transcoder_shares_its_latents_with_itself(tmp_path: Path, redis_url: str, store: Store) -> None:
    _planted(tmp_path, store, "a", seed=0)
    _planted(tmp_path, store, "b", seed=0)
    _planted(tmp_path, store, "c", seed=7)
    same = json.loads(_cli("compare", "a", "b", "--json", redis_url=redis_url, data_dir=tmp_path).stdout)
    assert len(same["shared"]) == 3 and not same["unique_a"] and all(p["cosine"] > 0.999 for p in same["pairs"])
    other = _cli("compare", "a", "c", redis_url=redis_url, data_dir=tmp_path)
    assert other.returncode == 0 and "unique" in other.stdout.lower()
