# make install | make test | make demo
PYTHON ?= python3
VENV   := .venv
PIP    := $(VENV)/bin/pip --disable-pip-version-check -q
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-all demo clean bigbench-data

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt "torch==2.13.0"
	$(PIP) install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# The offline demo: SmolLM2-135M-Instruct (from a PyPI package) learns three small tasks on the
# CPU; held-out accuracy per task before and after training is printed as a table.
DEMO_MODEL := .models/smollm2-135m-instruct
RLORA      := HF_HUB_OFFLINE=1 $(VENV)/bin/rlora

DEMO_STAMP := $(VENV)/.installed-demo

$(DEMO_STAMP): $(STAMP)
	$(PIP) install -c constraints.txt -e ".[dev,demo]"
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(PY) scripts/prepare_smollm2.py $(DEMO_MODEL)
	mkdir -p runs/demo-eval
	$(RLORA) eval --task recipe --recipe recipes/demo.yaml --model $(DEMO_MODEL) --output runs/demo-eval/before.json
	$(RLORA) train recipes/demo.yaml --output runs/demo --overwrite
	$(RLORA) eval --task recipe --adapter runs/demo --output runs/demo-eval/after.json
	$(RLORA) eval compare runs/demo-eval/before.json runs/demo-eval/after.json --plot runs/demo-eval/before_after.png

test: install
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-all: install
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not gpu"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# BIG-bench's JSON tasks (~360 MB sdist, 1041 task.json files) into data/bigbench/ (git-ignored)
bigbench-data: install
	$(PIP) download --no-deps --no-binary :all: bigbench==1.0.0 -d data/.bigbench-sdist
	$(PY) -m benchmarks.mtl.fetch_bigbench data/.bigbench-sdist --out data/bigbench
