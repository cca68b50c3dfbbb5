# Two commands for a new user: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TP ?= 2
DEMO_PROMPT ?= def read_lines(path):
DEMO_CKPT := out/tiny-mamba2-tp$(TP)

.PHONY: demo test test-gpu test-random coverage mutation venv clean

# Without a GPU, take torch's CPU build first (where the machine has one): a bare `torch` requirement
# would pull a multi-GB CUDA build that a CPU-only machine never uses.
TORCH_CPU ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	command -v nvidia-smi >/dev/null 2>&1 || $(PY) -m pip install -q '$(TORCH_CPU)' || true
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) tools/convert_hf.py --load-dir megatron_ssm/assets/tiny-mamba2 --save-dir $(DEMO_CKPT) --tp $(TP) --dtype float32 --force
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(TP) examples/generate.py --load $(DEMO_CKPT) \
		--prompt '$(DEMO_PROMPT)' --max-new-tokens 64 --temperature 0

# Two workers: a test spends much of its time in processes it starts (ranks, torchrun, the server)
# and waiting on them, so two workers keep both of CI's 2 cores busy. loadfile keeps a module's
# tests (and its module-scoped server and checkpoints) on one worker, and --no-loadscope-reorder hands
# modules out in conftest's order (longest first) instead of by their number of tests.
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -q -m 'not gpu' -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20 tests

GPU_WORKERS ?= 8
test-gpu: venv
	$(PY) -m pytest -q -m gpu -n $(GPU_WORKERS) tests

# The dev extra (pytest-randomly, pytest-cov, mutmut); docs/testing.md says what each shows.
$(VENV)/.dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

SEED ?= $(shell date +%s)
test-random: $(VENV)/.dev
	$(PY) -m pytest -q -m 'not gpu' -p randomly --randomly-seed=$(SEED) tests

coverage: $(VENV)/.dev
	$(PY) -m pytest -q -m 'not gpu' --cov=megatron_ssm --cov-report=term-missing tests

mutation: $(VENV)/.dev
	PY=$(PY) tools/mutation.sh

clean:
	rm -rf out
