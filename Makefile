# `make demo` and `make test` each set everything up (a .venv, the project, its dev tools) and then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_INSTALL := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: demo test bench bench-peers lint clean setup

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/llmlab speedrun --preset cpu-demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -x -p no:cacheprovider

# bench_quant.py and bench_speculative.py measure trained checkpoints (their docstrings say how to make them,
# e.g. `make demo` for bench_quant.py); the others need nothing but the package. Each one's output goes to
# runs/bench/NAME.json, then summary.py prints one table of all targets and fails if one was missed.
MODEL_BENCH := benchmarks/bench_quant.py benchmarks/bench_speculative.py
BENCH_OUT := runs/bench
# bench_rl.py's PPO peer: trl 1.12, the last TRL with a PPOTrainer, beside (not over) the trl the project pins;
# bench_rl runs it in its own process with this directory first on PYTHONPATH.
TRL_PPO_PEER := benchmarks/.peers/trl-1.12
bench-peers: $(STAMP)
	test -d $(TRL_PPO_PEER)/trl || $(BIN)/python -m pip install -q --no-deps --target $(TRL_PPO_PEER) trl==1.12.0

bench: $(STAMP) bench-peers
	rm -rf $(BENCH_OUT) && mkdir -p $(BENCH_OUT)
	for b in $(filter-out $(MODEL_BENCH),$(wildcard benchmarks/bench_*.py)); do \
		echo "== $$b"; $(BIN)/python $$b --no-check | tee $(BENCH_OUT)/$$(basename $$b .py).json; done
	$(BIN)/python benchmarks/summary.py $(BENCH_OUT)/*.json --not-run $(MODEL_BENCH)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info $(TRL_PPO_PEER)
