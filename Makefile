# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: the CPU build on local disk (an unpinned torch pulls a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

.PHONY: demo test bench-speed bench-glue
demo: $(STAMP)
	$(VENV)/bin/reparam demo

# One thread per worker: two 2-thread processes side by side each run 3-4x slower on 2 cores.
test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile tests

bench-speed: $(STAMP)
	$(PY) bench/speed.py

bench-glue: $(STAMP)
	$(PY) bench/glue.py --quick
