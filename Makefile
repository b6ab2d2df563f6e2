# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv on first use. torch is pinned first to the CPU build that
# installs in seconds; setup.cfg keeps a range that this pin satisfies.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test test-slow bench proto docs clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gapaware train --task digits-cnn --workers 4 --policy gap-aware

# Two test processes (pytest-xdist), a file each at a time, so a file's module fixtures run once.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Each benchmark prints ratios measured side by side in one run; BENCH_QUICK=1 is a smoke test.
BENCHMARKS := transport server_update end_to_end scale memory overlap free_work push_norms time_to_accuracy links shards
bench: $(STAMP)
	uptime
	set -e; for name in $(BENCHMARKS); do $(BIN)/python -m bench.$$name; done
	uptime

proto: $(STAMP)
	$(BIN)/python -m gapaware.proto.generate

docs: $(STAMP)
	$(BIN)/python -m gapaware.cli_reference README.md

clean:
	rm -rf $(VENV) build *.egg-info
