# Two commands for a new user: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TP ?= 2
DEMO_PROMPT ?= def read_lines(path):
DEMO_CKPT := out/tiny-mamba2-tp$(TP)

.PHONY: demo test test-gpu venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) tools/convert_hf.py --load-dir megatron_ssm/assets/tiny-mamba2 --save-dir $(DEMO_CKPT) --tp $(TP) --dtype float32 --force
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(TP) examples/generate.py --load $(DEMO_CKPT) \
		--prompt '$(DEMO_PROMPT)' --max-new-tokens 64 --temperature 0

test: venv
	$(PY) -m pytest -q -m 'not gpu' tests

test-gpu: venv
	$(PY) -m pytest -q -m gpu tests

clean:
	rm -rf out
