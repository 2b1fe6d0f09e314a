# Two commands: `make lab` and `make test` (and `make test-all`, what CI runs). All set up .venv first and are
# safe to re-run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
KERNEL := big-model-inference
STAMP := $(VENV)/.installed
PORT ?= 8888
LAB_IP ?= 127.0.0.1
NOTEBOOK_DIR ?= notebooks
# Test processes run side by side (pytest-xdist); two suit the 2-core machines the suite is tested on.
JOBS ?= 2
PYTEST := $(BIN)/python -m pytest -p no:cacheprovider
# Containers and CI often run as root, which Jupyter refuses without this flag.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: lab test test-all site setup clean-cache

setup: $(STAMP)

# Reinstall only when the pins change. torch==2.13.0 is pinned in requirements.txt (a CPU build on
# the lab machines); constraints.txt pins everything else pip resolves, for a reproducible install.
$(STAMP): requirements.txt constraints.txt pyproject.toml tools/lab-overrides.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Big-model inference (.venv)"
	mkdir -p $(VENV)/share/jupyter/lab/settings  # no news or update pop-ups in front of a room
	cp tools/lab-overrides.json $(VENV)/share/jupyter/lab/settings/overrides.json
	touch $(STAMP)

lab: setup
	$(BIN)/jupyter lab --no-browser --ip=$(LAB_IP) --port=$(PORT) --notebook-dir=$(NOTEBOOK_DIR) \
		$(ALLOW_ROOT)

# The newcomer's check: unit tests, suite checks and every notebook executed once with nbmake, side by side.
test: setup
	$(PYTEST) -n $(JOBS) --dist worksteal --nbmake --nbmake-timeout=600 tests notebooks \
		--ignore=tests/test_browser.py

# Everything, as CI runs it: the unit and suite tests side by side, then the real-browser test, which runs every
# notebook twice in one kernel in JupyterLab (so nbmake's single run is not repeated) and drives the apps.
test-all: setup
	$(PYTEST) -n $(JOBS) --dist worksteal tests --ignore=tests/test_browser.py
	$(PYTEST) tests/test_browser.py

# The notebooks as executed on GPUs (data/executed/<run>/), rendered with their outputs into site/, offline.
site: setup
	$(BIN)/python tools/build_site.py

clean-cache:
	rm -rf .cache
