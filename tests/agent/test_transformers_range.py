"""The language-model tests again, on the oldest transformers the ``hf`` extra allows.

The suite itself runs on the locked (newest tested) transformers; ``make install`` puts the floor
release, from requirements-hf-oldest.txt, in ``.venv/hf-oldest``, and this test runs the
modules that touch transformers in a subprocess with that folder first on the path.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from helpers import ROOT

MODULES = [
    "tests/agent/test_lm_positions.py",
    "tests/agent/test_lm_tokens.py",
    "tests/explain/test_llm_backends.py::test_hf_backend_runs_generate_on_a_local_model",
    "tests/agent/test_agents.py::test_tiny_gpt2_token_rows",
]


def _floor() -> str:
    hf = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["hf"]
    (spec,) = [s for s in hf if s.startswith("transformers")]
    m = re.search(r">=\s*([0-9][0-9.]*)", spec)
    assert m, f"the hf extra's transformers has no floor: {spec!r}"
    return m.group(1)


def _pinned() -> str:
    text = (ROOT / "requirements-hf-oldest.txt").read_text()
    m = re.search(r"^transformers==(\S+)$", text, re.MULTILINE)
    assert m, "requirements-hf-oldest.txt pins no transformers"
    return m.group(1)


def _same_release(a: str, b: str) -> bool:
    pad = lambda v: [int(x) for x in v.split(".")] + [0] * (3 - len(v.split(".")))  # noqa: E731
    return pad(a) == pad(b)


def test_the_oldest_pin_is_the_extras_floor() -> None:
    assert _same_release(_pinned(), _floor()), (
        f"requirements-hf-oldest.txt pins transformers {_pinned()} but the hf extra allows >= {_floor()}: raise both together"
    )


@pytest.mark.timeout(600)
def test_language_model_tests_pass_on_the_oldest_transformers() -> None:
    target = Path(sys.prefix) / "hf-oldest"
    assert (target / "transformers").is_dir(), f"{target} is missing: `make install` puts the oldest transformers there"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    version = subprocess.run(
        [sys.executable, "-c", "import transformers; print(transformers.__version__)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert version.returncode == 0, version.stderr
    assert _same_release(version.stdout.strip(), _floor()), (
        f"{target} holds transformers {version.stdout.strip()}, not {_floor()}"
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *MODULES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert run.returncode == 0, f"on transformers {_floor()}:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    assert re.search(r"\b\d+ passed\b", run.stdout) and " skipped" not in run.stdout.splitlines()[-1], run.stdout[-2000:]
