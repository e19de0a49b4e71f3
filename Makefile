# make test   -- the test suite exactly as CI runs it (creates .venv on first use)
# make test-all -- also the `extended` multi-rank cases CI leaves out (tests/conftest.py)
# make demo   -- the main job on the embedded default (small real run on CPU, < 8 minutes with the venv;
#                THREADS=N sets the CPU threads, default the cores less one: modeling/threads.py; DEMO_ARGS="..." more options)
# make parity -- recompute the reference fixtures in ../shared/parity
PY := .venv/bin/python

.PHONY: venv test test-all demo parity
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

demo: venv
	$(PY) -m examples.demo $(if $(THREADS),--threads $(THREADS)) $(DEMO_ARGS)

parity: venv
	$(PY) -m bench.parity ../shared/parity
