"""`interlatent demo --headless` end to end, as `make demo ARGS=--headless` runs it: the services in
their own processes, the pushed CartPole policy streaming, and the summary of every part: failures
of more than one mode, the auto-trained transcoder's latents with labels and scores, alerts on
latents with their explanations, early-warning precision and lead, one steer applied and reverted
with its effect on returns. Bad input is one line and exit status 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, free_endpoint

MODES = ("pole_left", "pole_right", "cart_out")


def _demo(tmp: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", INTERLATENT_REDIS_URL="")
    env["INTERLATENT_ENDPOINT"] = free_endpoint()
    return subprocess.run(
        [sys.executable, "-m", "monitor", "--log-level", "WARNING", "demo", "--data-dir", str(tmp), *args],
        cwd=str(ROOT),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(450)
def test_headless_demo_shows_every_part(tmp_path: Path) -> None:
    # a briefly trained policy (cached in tmp_path like the real one) keeps the test short
    r = _demo(tmp_path, "--headless", "--train-steps", "4096")
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    assert "every part has shown" in out, out[-3000:]
    summary = out.split("== what the demo showed", 1)[1]

    ended = re.search(r"^episodes: (\d+), mean return [\d.]+; ended by (.+)$", summary, re.M)
    assert ended, summary
    counts = dict((m, int(k)) for m, k in re.findall(r"(\w+) (\d+)", ended[2]))
    assert sum(counts.values()) == int(ended[1])
    assert len([m for m in MODES if counts.get(m)]) >= 2, counts  # episodes fail in more than one way

    latents = re.findall(
        r"^  latent (\d+): '(.+)'  detection (\d\.\d\d) \(shuffled [\d.]+\), simulation r (-?[\d.]+)$", summary, re.M
    )
    assert [int(j) for j, *_ in latents] == [0, 1, 2, 3], summary  # the 4-latent transcoder, every latent explained
    assert all(label and 0 <= float(det) <= 1 for _, label, det, _ in latents)

    fired = re.search(r"^alerts: (\d+) fired, \d+ resolved; (.+)$", summary, re.M)
    assert fired and int(fired[1]) > 0 and re.search(r"latent-spike \d+ \(on latents\)", fired[2]), summary
    on_latents = re.findall(r"^  latent-spike on latent (\d+) at step \d+ \(z [\d.]+\): explained as '(.+)'$", summary, re.M)
    labels = {j: label for j, label, *_ in latents}
    assert on_latents and all(labels[j] == label for j, label in on_latents)  # the alert carries its latent's label

    assert re.search(r"^early warning, on the \d+ episodes no steer touched \(\d+ failed\)", summary, re.M)
    rules = re.findall(r"^  (\S+) +alerts +(\d+)  precision (\S+)  recall (\S+)  median lead (\S+) steps$", summary, re.M)
    assert {"latent-spike", "pole-angle-out"} <= {rule for rule, *_ in rules}, summary
    assert any(p != "-" and float(p) > 0 and lead != "-" for _, _, p, _, lead in rules)

    steer = re.search(
        r"^steer: add alpha=[+-][\d.]+ along latent \d from step (\d+) to (\d+): mean return ([\d.]+) over (\d+) episodes "
        r"while on, ([\d.]+) over (\d+) before",
        summary,
        re.M,
    )
    assert steer, summary
    assert int(steer[1]) < int(steer[2]) and int(steer[4]) >= 1 and int(steer[6]) >= 1  # applied, then reverted
    assert re.search(r"after the revert: mean return [\d.]+ over [1-9]\d* episodes", summary)
    assert re.search(r"^done: \d+ episodes, agent sent \d+ messages, dropped \d+ records$", summary, re.M)


def test_demo_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for args, says in (
        (["--rules", str(tmp_path / "none.yaml")], "no rules file"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--rate", "-1"], "--rate must be >= 0"),
    ):
        r = _demo(tmp_path, "--headless", *args, timeout=60)
        assert r.returncode == 2 and says in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    (tmp_path / "bad.yaml").write_text("rules:\n  - name: x\n    kind: nope\n")
    r = _demo(tmp_path, "--headless", "--rules", str(tmp_path / "bad.yaml"), timeout=60)
    assert r.returncode == 2 and "rule 'x': field 'kind'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
