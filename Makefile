# Two commands matter: `make demo` and `make test`. Both build .venv from nothing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARGS    ?=

.PHONY: demo test bench install browser lint clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned: here that takes the local CPU build; anything looser pulls GBs of CUDA packages
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[service,rl,hf,dev]"
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

bench: $(STAMP)
	$(BIN)/interlatent bench hook $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check agent_side monitor explainer tests examples

clean:
	rm -rf $(VENV) .pytest_cache
