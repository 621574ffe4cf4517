# fedrwe: two commands on a fresh machine.
#   make demo   set up, then run the 3-site simulated study (results + report in out/demo)
#   make test   set up, then run the test suite (unit, federated-equals-pooled, integration)
#   make bench  quick benchmarks (~20 min); make bench-full the full ones (~50 min, docs/benchmarks.md)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedrwe-installed
BENCH_STAMP := $(VENV)/.fedrwe-bench-installed

DEMO_SITES    ?= 3
DEMO_PATIENTS ?= 30000
DEMO_SEED     ?= 7
DEMO_OUT      ?= out/demo

.PHONY: demo test test-slow lint setup setup-bench bench bench-full java chromium clean

demo: setup
	$(BIN)/fedrwe simulate --sites $(DEMO_SITES) --patients $(DEMO_PATIENTS) --seed $(DEMO_SEED) --out $(DEMO_OUT)

test: setup
	$(BIN)/pytest -m "not slow" -q

test-slow: setup
	$(BIN)/pytest -m slow -q

# Benchmarks never run in make test: bench/run_all.py prints tables, writes bench/results/*.json
# and refreshes the tables of docs/benchmarks.md.
bench: setup-bench
	$(BIN)/python bench/run_all.py --quick

bench-full: setup-bench
	$(BIN)/python bench/run_all.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

setup: java chromium $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "fedrwe needs Python >= 3.11; this is " + sys.version.split()[0] + ". Fix: install python3.11 and run: make PYTHON=python3.11 ...")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip check
	@touch $(STAMP)

setup-bench: setup $(BENCH_STAMP)

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install -q -e ".[test,bench]"
	@touch $(BENCH_STAMP)

# Spark needs a Java runtime (17 is tested).
java:
	@if command -v java >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "java is missing: installing openjdk-17-jre-headless"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openjdk-17-jre-headless; \
	else \
	  echo "fedrwe needs Java for Spark and 'java' is not on PATH. Fix: run"; \
	  echo "  sudo apt-get install -y openjdk-17-jre-headless"; \
	  echo "then run make again."; exit 1; \
	fi

# The report's browser test (tests/test_report_browser.py) renders report.html in Debian's Chromium.
chromium:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "chromium is missing: installing Debian's chromium"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else \
	  echo "fedrwe's report test needs /usr/bin/chromium. Fix: run"; \
	  echo "  sudo apt-get install -y chromium"; \
	  echo "then run make again."; exit 1; \
	fi

clean:
	rm -rf out .pytest_cache
