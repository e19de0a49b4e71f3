# make test   -- the test suite exactly as CI runs it (creates .venv on first use)
# make demo   -- the main job on the embedded default (small real run on CPU, < 8 minutes with the venv;
#                THREADS=N sets the CPU threads, default the cores: modeling/threads.py; DEMO_ARGS="..." more options)
# make parity -- recompute the reference fixtures in ../shared/parity
PY := .venv/bin/python

.PHONY: venv test demo parity
venv: .venv/.installed
.venv/.installed: requirements/cpu.txt requirements/nodeps.txt setup.py
	bash scripts/setup_venv.sh
	touch $@

# OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning, which matters on 2 shared cores
# where tests start subprocesses (DeepSpeed ranks, the demo's stages); the thread counts come from
# modeling/threads.py (tests/conftest.py; THREADS=N or $VAVAE_THREADS overrides)
test: venv
	OMP_WAIT_POLICY=PASSIVE $(if $(THREADS),VAVAE_THREADS=$(THREADS)) $(PY) -m pytest -m "not gpu" -q

demo: venv
	$(PY) -m examples.demo $(if $(THREADS),--threads $(THREADS)) $(DEMO_ARGS)

parity: venv
	$(PY) -m bench.parity ../shared/parity
