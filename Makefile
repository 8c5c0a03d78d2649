# Two commands matter: `make demo` and `make test`. Both build .venv from nothing, with the exact
# versions in requirements.lock (CPython 3.11 on Linux), so a fresh machine gets what was tested.
SHELL   := /bin/bash
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARGS    ?=
# torch is pinned apart from the lock: here ==2.13.0 takes the local CPU build; anything looser
# pulls GBs of CUDA packages. Its own dependencies are in the lock.
TORCH   := torch==2.13.0
PIP_VER := pip==26.3
UV_VER  := uv==0.13.9
EXTRAS  := service,rl,hf,dev,peers
# the oldest transformers the hf extra allows, beside the venv's own, for tests/agent/test_transformers_range.py
HF_OLD  := hf-oldest

.PHONY: demo test test-latest bench install browser lint typecheck lock clean

# what the newest releases change against the lock, one line a package (names normalized as pip does)
define LOCK_DIFF
import re, sys
def pins(path):
    out = {}
    for line in open(path):
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split(";")[0].strip().split("==", 1)
            out[re.sub(r"[-_.]+", "-", name).lower()] = version
    return out
lock, latest = pins(sys.argv[1]), pins(sys.argv[2])
moved = [f"{n}: {lock.get(n, '-')} -> {latest.get(n, '-')}" for n in sorted(set(lock) | set(latest)) if n != "torch" and lock.get(n) != latest.get(n)]
print("\n".join(moved) if moved else "the newest releases are the locked ones")
endef
export LOCK_DIFF

$(STAMP): pyproject.toml requirements.lock requirements-hf-oldest.txt Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(PIP_VER)"
	$(BIN)/pip install --quiet --no-deps "$(TORCH)" -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	rm -rf $(VENV)/$(HF_OLD) && $(BIN)/pip install --quiet --no-deps --target $(VENV)/$(HF_OLD) -r requirements-hf-oldest.txt
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/interlatent demo $(ARGS)

# The panel's browser test drives Debian's Chromium (no browser download); the test skips, saying
# why, only where it cannot be installed.
browser:
	@command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
		|| (command -v sudo >/dev/null && sudo -n apt-get install -y -q chromium >/dev/null 2>&1) \
		|| echo "note: could not install chromium; the panel's browser test will be skipped"

test: $(STAMP) browser
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(ARGS)

# Drift before users see it: a separate venv with the newest releases pyproject.toml's ranges allow
# (torch pinned as above), and the whole suite on it. Not part of .ci/run.
test-latest: browser
	rm -rf .venv-latest && $(PY) -m venv .venv-latest
	.venv-latest/bin/pip install --quiet --upgrade pip
	.venv-latest/bin/pip install --quiet "$(TORCH)"
	.venv-latest/bin/pip install --quiet --upgrade -e ".[$(EXTRAS)]"
	.venv-latest/bin/pip install --quiet --no-deps --target .venv-latest/$(HF_OLD) -r requirements-hf-oldest.txt
	.venv-latest/bin/pip freeze --exclude-editable > .venv-latest/freeze.txt
	.venv-latest/bin/python -c "$$LOCK_DIFF" requirements.lock .venv-latest/freeze.txt
	OMP_NUM_THREADS=1 .venv-latest/bin/python -m pytest -q $(ARGS)

# Regenerate requirements.lock from pyproject.toml's extras with uv. torch resolves against the
# local CPU wheel where the machine has one (/opt/wheels), so no CUDA package enters the lock.
lock:
	test -x .venv-lock/bin/uv || ($(PY) -m venv .venv-lock && .venv-lock/bin/pip install --quiet "$(UV_VER)")
	echo "$(TORCH)$$(test -d /opt/wheels && echo +cpu)" > .venv-lock/torch-constraint.txt
	.venv-lock/bin/uv pip compile pyproject.toml --extra service --extra rl --extra hf --extra dev --extra peers --python-version 3.11 \
		--no-emit-package torch --constraint .venv-lock/torch-constraint.txt \
		$$(test -d /opt/wheels && echo --find-links /opt/wheels) --quiet --output-file requirements.lock
	@! grep -nE '^(nvidia|triton|cuda)' requirements.lock || (echo "CUDA packages in the lock: resolve torch against a CPU wheel"; exit 1)

# mypy on the core ([tool.mypy] in pyproject.toml says which files)
typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/interlatent bench hook $(ARGS)

# ruff, and the import contracts in pyproject.toml (the layers of ARCHITECTURE.md)
lint: $(STAMP)
	$(BIN)/ruff check agent_side monitor explainer tests examples
	$(BIN)/ruff format --check agent_side monitor explainer tests examples
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .venv-latest .venv-lock .pytest_cache
