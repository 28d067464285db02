# Every target works on a fresh checkout: it creates .venv itself.
# Stamp files inside .venv make repeated invocations fast; they depend on
# pyproject.toml, so changing dependencies triggers a reinstall.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

DEMO_OUT ?= out/demo
DEMO_ARGS ?=
BENCH_ARGS ?=
TRITON_ARGS ?=
# triton (1 GB) for `make triton-check` only, in its own environment.
TRITON_VENV ?= .venv-triton
# Two workers: compiling dominates the suite and XLA:CPU compiles on one thread.
# --dist worksteal: an idle worker takes tests queued for the other, so the
# long tests (a subprocess on 8 simulated devices, the docs) do not leave one idle.
TEST_WORKERS ?= 2
# Test suites plus doctests in the package, the README and docs/ (whichever exist).
# The doc pages (2-15 s each) first: the workers then end on short tests, within
# a second of each other (they ended 7 s apart when the pages came last).
TEST_PATHS := $(wildcard docs README.md) nnx_recurrent $(wildcard compat tests)
PYTEST_ARGS = -q -n $(TEST_WORKERS) --dist worksteal --doctest-modules --doctest-glob='*.md' $(TEST_PATHS)

.PHONY: venv install-test install-examples install-docs test test-newest test-gpu-jax demo bench fuzz triton-check docs clean

venv: $(VENV)/.created

$(VENV)/.created:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	touch $@

install-test: $(VENV)/.test-installed
install-examples: $(VENV)/.examples-installed
install-docs: $(VENV)/.docs-installed

$(VENV)/.%-installed: pyproject.toml $(VENV)/.created
	$(PIP) install -e '.[$*]'
	touch $@

# A compilation cache for one run, shared by both workers and the subprocesses: many
# tests compile a program another has compiled (the same layer at the same shapes), and
# XLA's compiling is a third of the suite's time. Empty at each start, removed after, so
# a run costs what a fresh clone's costs (AMD, 2 cores, three runs each: 4:41-4:51
# against 4:57-5:06 without, session 45).
TEST_CACHE = JAX_COMPILATION_CACHE_DIR=$$cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
	JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0

# mypy (20 s cold, one core) runs beside the tests; its report follows theirs.
test: install-test
	$(VENV)/bin/ruff check .
	@$(VENV)/bin/mypy > .mypy.log 2>&1 & mypy=$$!; cache=$$(mktemp -d); \
	$(TEST_CACHE) $(PY) -m pytest $(PYTEST_ARGS); \
	tests=$$?; rm -rf $$cache; wait $$mypy; types=$$?; echo "mypy:"; cat .mypy.log; \
	rm -f .mypy.log; exit $$((tests || types))

# The suite on the newest jax and flax that pip installs for another Python (jax 0.11
# needs Python 3.12 or later), in its own environment, without the PyTorch tests
# (PyPI's torch==2.13.0 is the CUDA build). Remove $(NEWEST_VENV) to take newer releases;
# with pyenv: make test-newest NEWEST_PYTHON=$$(pyenv root)/versions/3.12.1/bin/python3.12
# (Python 3.13 passes too: NEWEST_PYTHON=.../3.13.0/bin/python3.13 NEWEST_VENV=.venv-313)
NEWEST_PYTHON ?= python3.12
NEWEST_VENV ?= .venv-newest
NO_TORCH := --ignore=tests/test_interop_torch.py --ignore=docs/migrating_from_pytorch.md \
	--ignore=nnx_recurrent/interop/torch.py
test-newest: $(NEWEST_VENV)/.created
	$(NEWEST_VENV)/bin/python -c "import jax, flax, numpy; print('jax', jax.__version__, 'flax', flax.__version__, 'numpy', numpy.__version__)"
	@cache=$$(mktemp -d); PYTHONPATH=$(CURDIR) $(TEST_CACHE) $(NEWEST_VENV)/bin/python -m pytest \
	  $(PYTEST_ARGS) $(NO_TORCH); tests=$$?; rm -rf $$cache; exit $$tests

$(NEWEST_VENV)/.created:
	test -x $(NEWEST_VENV)/bin/python || $(NEWEST_PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install --upgrade pip jax jaxlib flax numpy optax \
	  orbax-checkpoint pytest pytest-xdist tqdm
	touch $@

# The Pallas kernels' tests, their lowering to Triton for CUDA included, on the jax and
# flax of the lent GPU machine (benchmarks/RESULTS.md, "GPU"), for Python 3.12 or later
# (NEWEST_PYTHON): a kernel that lowers on this machine's jax may not on that one (session
# 37: jax 0.11.2 and 0.12 reject a reduction over both axes of a 2-D value, 0.10.2 takes
# it). Remove $(GPU_JAX_VENV) after changing the versions.
GPU_JAX ?= 0.11.2
GPU_FLAX ?= 0.12.10
GPU_JAX_VENV ?= .venv-gpu-jax
GPU_JAX_TESTS := tests/test_pallas.py tests/test_gpu_scripts.py tests/test_multiblock_probe.py \
	tests/test_mosaic_probe.py
test-gpu-jax: $(GPU_JAX_VENV)/.created
	$(GPU_JAX_VENV)/bin/python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__)"
	PYTHONPATH=$(CURDIR) $(GPU_JAX_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) \
	  -W ignore::DeprecationWarning $(GPU_JAX_TESTS)

$(GPU_JAX_VENV)/.created:
	test -x $(GPU_JAX_VENV)/bin/python || $(NEWEST_PYTHON) -m venv $(GPU_JAX_VENV)
	$(GPU_JAX_VENV)/bin/python -m pip install --upgrade pip jax==$(GPU_JAX) jaxlib==$(GPU_JAX) \
	  flax==$(GPU_FLAX) numpy optax pytest pytest-xdist
	touch $@

demo: install-examples
	$(PY) -m examples.japanese_vowels --out $(DEMO_OUT) $(DEMO_ARGS)

bench: install-test
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# Differential fuzzing against flax.nnx, flax.linen, PyTorch and step-by-step
# loops (fuzz/): not in `make test`; 200 cases of each of the eleven families take
# well over an hour on 2 cores (estimated from each family's campaign; reduced
# precision, convolutional and 8-device cases cost more). A failure prints the
# command that replays its case. On 8 simulated CPU devices, so that the
# `explicit` family draws (data, model) meshes (on one device its mesh is (1, 1));
# the other families run on the first device as on one.
FUZZ_FAMILY ?= all
FUZZ_CASES ?= 200
FUZZ_SEED ?= 0
fuzz: install-test
	XLA_FLAGS="$$XLA_FLAGS --xla_force_host_platform_device_count=8" \
	  $(PY) -m fuzz --family $(FUZZ_FAMILY) --cases $(FUZZ_CASES) --seed $(FUZZ_SEED) --out out/fuzz.json

# The Pallas kernels compiled by Triton for an H200, without a GPU: shared
# memory, registers, spills (benchmarks/triton_resources.py).
triton-check: install-test $(TRITON_VENV)/.created
	$(PY) -m benchmarks.triton_resources --triton-python $(TRITON_VENV)/bin/python $(TRITON_ARGS)

$(TRITON_VENV)/.created:
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install triton==3.9.0
	touch $@

docs: install-docs
	$(PY) -m sphinx -W docs docs/_build/html

clean:
	rm -rf out docs/_build build *.egg-info .pytest_cache .ruff_cache .mypy_cache
