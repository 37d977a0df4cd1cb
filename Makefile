# Two commands for a newcomer: `make demo` and `make test`. Both install what they need into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hyads-installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch is pinned to the local CPU build; anything else pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Fit on MVTec AD bottle (../shared/data, or $$HYADS_DATA), evaluate, write demo-output/report/index.html.
demo: $(STAMP)
	$(VENV)/bin/hyads demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

# Long measurements (not part of `make test`); figures go to docs/RESULTS.md.
bench: $(STAMP)
	$(PY) -m pytest -q -m benchmark -s $(ARGS)

clean:
	rm -rf $(VENV) demo-output .pytest_cache
