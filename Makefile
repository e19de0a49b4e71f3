# make test   -- the test suite exactly as CI runs it (creates .venv on first use)
# make test-all -- also the `extended` multi-rank cases CI leaves out (tests/conftest.py)
# make demo   -- the main job on the embedded default (small real run on CPU, < 8 minutes with the venv;
#                THREADS=N sets the CPU threads, default the cores less one: modeling/threads.py; DEMO_ARGS="..." more options)
# make parity -- recompute the reference fixtures in ../shared/parity
# make test-lent -- the CPU suite under the lent GPU machine's torch 2.11 + Triton 3.6 (a side venv, .venv-lent,
#                ~5 GB: requirements/lent.txt), before a device session; not CI. Its own JIT extensions folder:
#                DeepSpeed's CPU shm op built by the main venv's torch does not load under 2.11
PY := .venv/bin/python

.PHONY: venv test test-all test-lent demo parity
venv: .venv/.installed
.venv/.installed: requirements/cpu.txt requirements/nodeps.txt setup.py
	bash scripts/setup_venv.sh
	touch $@
# The lent GPU machine's Triton beside the venv's (requirements/triton_lent.txt): the sm_90 compile check runs both
LENT_TRITON := .venv/triton-lent
$(LENT_TRITON)/.installed: requirements/triton_lent.txt .venv/.installed
	$(PY) -m pip install -q --no-deps --upgrade --target $(LENT_TRITON) -r requirements/triton_lent.txt
	touch $@

# OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning, which matters on 2 shared cores
# where tests start subprocesses (DeepSpeed ranks, the demo's stages); the thread counts come from
# modeling/threads.py (tests/conftest.py; THREADS=N or $VAVAE_THREADS overrides)
# -n auto --dist loadfile: one pytest worker per core (tests/conftest.py gives each its share of the threads), a
# file's tests on one worker (a module-scoped training run is made once); --no-loadscope-reorder: the files in
# conftest's order, the slowest first (xdist would order them by test count).
# `make test` leaves out the `extended` cases (further launchers / trainers / stages of a behaviour CI tests once);
# `make test-all` runs them too (about 20 minutes on 2 cores).
# --durations=15: the slowest tests at the end of every run (the 10-minute budget: conftest's SLOWEST_FIRST)
PYTEST := OMP_WAIT_POLICY=PASSIVE $(if $(THREADS),VAVAE_THREADS=$(THREADS)) $(PY) -m pytest -q -n auto --dist loadfile \
	--no-loadscope-reorder --durations=15
test: venv $(LENT_TRITON)/.installed
	$(PYTEST) -m "not gpu and not extended"

test-all: venv $(LENT_TRITON)/.installed
	$(PYTEST) -m "not gpu"

# FP8 tests (and the suite smoke, which measures an FP8 ceiling) left out: torch 2.11's CPU _scaled_mm takes only
# per-tensor scales (the GPU's takes rowwise ones); the sm_90 compiles too (CI compiles with Triton 3.6 already)
.venv-lent/.installed: requirements/lent.txt requirements/triton_lent.txt requirements/cpu.txt requirements/nodeps.txt
	bash scripts/setup_lent_venv.sh
	touch $@
test-lent: .venv-lent/.installed
	PYTHONPATH=$(CURDIR) TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.venv-lent/inductor OMP_WAIT_POLICY=PASSIVE \
		TORCH_EXTENSIONS_DIR=$(CURDIR)/.venv-lent/torch_extensions .venv-lent/bin/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder -p no:cacheprovider \
		-m "not gpu and not extended" -k "not fp8 and not test_gpu_suite_cpu_smoke" \
		--deselect tests/test_kernels_sm90_lent_triton.py --deselect tests/test_kernels_sm90_compile.py

demo: venv
	$(PY) -m examples.demo $(if $(THREADS),--threads $(THREADS)) $(DEMO_ARGS)

parity: venv
	$(PY) -m bench.parity ../shared/parity
