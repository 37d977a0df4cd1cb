# Two commands for a newcomer: `make demo` and `make test`. Both install what they need into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hyads-installed

.PHONY: install system-deps demo test clean

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

# Headless Chromium for the web-page test (Debian packages; installed when running as root, else skipped).
system-deps:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	      || echo "note: could not install chromium; the browser test will be skipped"; \
	  else echo "note: chromium/chromedriver not installed; the browser test will be skipped"; fi; \
	fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) demo-output .pytest_cache
