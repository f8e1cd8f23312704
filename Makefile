# The two commands of the README: `make test` and `make demo`. Both set up everything on a fresh
# machine: a virtual environment in .venv with the CPU build of torch (CUDA builds are several GB
# and useless without a GPU), the package with its extras (test, bench, metrics: the CI runs the
# --metrics tests, which need TensorBoard), and the native extension.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 (CPU) lies on the CI machines' disk; triton 3.6 matches the GPU machines' image, so
# the interpreter tests exercise the same Triton API the GPU runs.
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
PYTEST_ARGS ?=

.PHONY: test demo build lint bench bench-kernels gpu-check clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,bench,metrics]"
	touch $@

build: $(VENV)/.installed
	$(PY) -m fastpar build

# After the suite, what guards the GPU run (no GPU needed): the pytest-benchmark suites run once
# each at tiny shapes, and gpu_check.sh's dry run must pass every stage (the same stages as on a
# GPU: tiny shapes, Triton's interpreter, CPU ranks). The GPU test modules must collect: the suite
# collects every module (gpu-marked tests are skipped, not deselected), and the dry run's tests
# stage runs each of them in its own pytest, where a collection error is a failed row.
# tests/run_suite.sh runs the suite in two pytest lanes side by side (single-process tests at
# nice 19 beside the multi-process ones); PYTEST_ARGS gives one plain pytest instead.
test: build
	$(PY) -m ruff check fastpar tests bench
	bash tests/run_suite.sh $(PY) $(PYTEST_ARGS)
	bash bench/gpu_check.sh --dry-run --out results/dry-run --python $(PY)

# The main job: a character LSTM language model trained data-parallel on 2 local processes
# over fastpar's ring (1500 steps, under a minute on 2 CPU cores), after the environment report.
# Each demo starts over: its scratch checkpoint folder is cleared (--overwrite), since a new run
# refuses a folder that already holds checkpoints.
demo: build
	$(PY) -m fastpar info
	$(PY) -m fastpar train --checkpoint-dir .demo-checkpoints --overwrite

lint: $(VENV)/.installed
	$(PY) -m ruff check fastpar tests bench
	$(PY) -m ruff format --check fastpar tests bench

# Every benchmark suite: tables on stdout, CSV and PNG plots in results/.
bench: build
	$(PY) -m fastpar bench all --results results

# The kernel micro-benchmarks (pytest-benchmark), saved for a later --benchmark-compare.
bench-kernels: build
	$(PY) -m pytest bench --benchmark-storage=results/benchmarks --benchmark-autosave

# The whole GPU check (on a machine with a GPU; see the README).
gpu-check:
	bash bench/gpu_check.sh --out results

clean:
	rm -rf $(VENV) build dist *.egg-info .demo-checkpoints results
