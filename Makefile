# The two commands of the README: `make demo` and `make test`.
# Both create (or reuse) the virtualenv in .venv and install the project first.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo-output

.PHONY: demo compare test unit lint install clean browser-deps

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $$($(PY) -c \
	  'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["tool"]["po-cluster"]["no-deps"]))')
	touch $(STAMP)

# The main job on a local Ray cluster: sweep (resumed if interrupted), soups, release, report.
demo: $(STAMP)
	$(VENV)/bin/po-cluster pipeline --config configs/demo-sweep.yaml

# Each loss once from the base model, single process, one comparison table.
compare: $(STAMP)
	$(VENV)/bin/po-cluster compare --config configs/compare.yaml --output-dir $(DEMO_DIR)

# BROWSER=0 skips the playground's browser test and the install of its browser (chromium, npm):
# `make test BROWSER=0` where neither root nor npm is at hand, CI included.
BROWSER ?= 1
# Two pytest workers: the integration tests in order on one (tests/conftest.py), the unit tests on the
# other, which uses the cores the first leaves idle while it waits on Ray, servers and subprocesses.
PARALLEL ?= -n 2 --dist loadgroup
BROWSER_TEST := tests/integration/serving/test_serving.py::test_playground_upload_slider_scores_change
ifeq ($(BROWSER),0)
test: $(STAMP) lint
	$(PY) -m pytest -q --durations=25 $(PARALLEL) --deselect $(BROWSER_TEST)
else
test: $(STAMP) lint browser-deps
	$(PY) -m pytest -q --durations=25 $(PARALLEL)
endif

# The serving playground's browser test (tests/integration/serving/test_serving.py) drives Debian's chromium
# through the npm package playwright-core (which downloads no browser). Installed when missing; where
# that is impossible (no root, no apt, no npm) the test is skipped with the reason, except in CI.
BROWSER_DIR := tests/browser
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo "sudo -n")
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "browser-deps: installing Debian's chromium (apt-get)"; \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	      --no-install-recommends chromium; } || { echo "browser-deps: could not install chromium"; test -z "$$CI"; }; }
	@if command -v npm >/dev/null 2>&1; then \
	  test $(BROWSER_DIR)/node_modules/.installed -nt $(BROWSER_DIR)/package-lock.json || { \
	    (cd $(BROWSER_DIR) && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --silent \
	     && touch node_modules/.installed) || { echo "browser-deps: npm ci failed"; test -z "$$CI"; }; }; \
	else echo "browser-deps: no npm, the playground browser test will be skipped"; test -z "$$CI"; fi

# The unit tests and the repository's checks (tests/unit, tests/repo), without those marked slow (full
# evaluations and trainings, which `make test` runs), on two workers: none starts a cluster or a server.
unit: $(STAMP)
	$(PY) -m pytest -q -n 2 tests/unit tests/repo -m "not slow"

# Lint (ruff, the whole repository) and type-check (mypy, the po_cluster package); settings in
# pyproject.toml. Any finding fails, so `make test` stops before pytest.
lint: $(STAMP)
	@status=0; $(VENV)/bin/ruff check . || status=1; $(VENV)/bin/mypy || status=1; exit $$status

clean:
	rm -rf $(VENV) $(DEMO_DIR) runs artifacts .pytest_cache
