# The two commands a newcomer runs: `make demo` and `make test`. Each creates .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE_STAMP := $(VENV)/.installed-base
TEST_STAMP := $(VENV)/.installed-test
PRO_JAX_SHARED_DATA ?= $(abspath ../shared/data)
# Both targets run on the CPU; jax[tpu] (installed for the AOT tests) must not probe for a TPU.
JAX_PLATFORMS ?= cpu
export PRO_JAX_SHARED_DATA JAX_PLATFORMS
DEMO_WORKDIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: test demo venv clean bench

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(BASE_STAMP): pyproject.toml | $(VENV)/bin/activate
	$(PY) -m pip install -q -e .
	touch $@

# test extras + jax[tpu]: the AOT tests compile the train step for real TPU topologies on this CPU
$(TEST_STAMP): pyproject.toml | $(VENV)/bin/activate
	$(PY) -m pip install -q -e ".[test,tpu]"
	touch $@ $(BASE_STAMP)

venv: $(BASE_STAMP)

demo: $(BASE_STAMP)
	$(VENV)/bin/pro-jax demo --workdir $(DEMO_WORKDIR)

test: $(TEST_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(BASE_STAMP)
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_dpo_step.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
