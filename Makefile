# The two commands a newcomer needs: `make run` and `make test`. Both build .venv and compile
# the hot path first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install build tools run test test-fast test-stock test-pure test-lowest lint bench bench-instructions clean

# The package installed editable as plain Python; `build` then compiles the hot path in place.
$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "model-gateway needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	MODEL_GATEWAY_PURE=1 $(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The hot path's modules (setup.py's COMPILED) as C extensions beside their sources, built
# with mypyc again whenever any source changes: Python imports an extension before the .py
# next to it, so a stale one would run instead of the code it was built from.
COMPILED := build/.compiled
SOURCES := $(shell find src -name '*.py')

## build: compile the hot path's modules with mypyc (after any change to src/)
build: $(COMPILED)

$(COMPILED): $(STAMP) setup.py $(SOURCES)
	@# none left over from a module setup.py no longer compiles; the rest are copied back
	find src -name '*.so' -delete
	$(BIN)/python setup.py --quiet build_ext --inplace
	@# an extension whose C did not change is copied with its old time: mark them all current
	find src -name '*.so' -exec touch {} +
	mkdir -p build && touch $(COMPILED)

install: $(COMPILED)

# Debian packages the tests and benchmarks use, each as package:command-or-file: promtool
# (prometheus), wrk, nginx, valgrind (instruction counts), and nginx's echo module (the
# benchmark's 20 ms model server).
DEBS := prometheus:promtool wrk:wrk nginx:nginx valgrind:valgrind \
	libnginx-mod-http-echo:/usr/lib/nginx/modules/ngx_http_echo_module.so

## tools: install what is missing of $(DEBS) from Debian's packages
tools:
	@missing=""; for pair in $(DEBS); do what=$${pair#*:}; \
	  { [ -e "$$what" ] || command -v "$$what" >/dev/null; } || missing="$$missing $${pair%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing from Debian's packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

## bench: wrk against a direct call, nginx and the gateway; results in benchmarks/results/
bench: $(COMPILED) tools
	$(BIN)/python benchmarks/run.py

## bench-instructions: instructions per request under callgrind, gateway vs the bare proxies
bench-instructions: $(COMPILED) tools
	$(BIN)/python benchmarks/instructions.py

## run: three demo model servers (fraud v1, v2 and a shadow v3) and the gateway in front of them on :8080
run: $(COMPILED)
	$(BIN)/model-gateway demo --config config/gateway.yaml

## lint: ruff and mypy --strict, as `make test` runs them
lint: $(COMPILED)
	$(BIN)/ruff check src tests benchmarks setup.py
	$(BIN)/ruff format --check src tests benchmarks setup.py
	$(BIN)/mypy --strict src

# The suite runs on several processes: most of its time is spent waiting on servers, so more
# processes than cores pay; the long tests start first (tests/conftest.py).
PARALLEL ?= -n 4 --dist worksteal

## test: lint, then the whole suite, on the compiled build
test: lint tools
	MODEL_GATEWAY_EXPECT_COMPILED=1 $(BIN)/pytest $(PARALLEL)

## test-fast: the tests not marked slow (under a minute): units, the in-process tier
## (tests/inprocess.py) and the quick single-server tests
test-fast: $(COMPILED)
	MODEL_GATEWAY_EXPECT_COMPILED=1 $(BIN)/pytest $(PARALLEL) -m "not slow"

## test-stock: the whole suite with the tuned server edge off (uvicorn's own protocol), as
## the gateway runs on an uvicorn release outside the tested range
test-stock: $(COMPILED) tools
	MODEL_GATEWAY_EDGE=stock MODEL_GATEWAY_EXPECT_COMPILED=1 $(BIN)/pytest $(PARALLEL)

## test-pure: the whole suite on plain Python, as a `MODEL_GATEWAY_PURE=1 pip install .` runs
## the gateway: from a copy of src/ without the compiled extensions (slower; not part of `make test`)
PURE_SRC := build/pure/src
test-pure: $(STAMP) tools
	rm -rf build/pure && mkdir -p build/pure
	cp -r src build/pure/ && find $(PURE_SRC) -name '*.so' -delete
	PYTHONPATH=$(CURDIR)/$(PURE_SRC) MODEL_GATEWAY_EXPECT_PURE=1 $(BIN)/pytest $(PARALLEL)

## test-lowest: the tests of what leans on its dependencies' internals (uvicorn's protocol and
## workers, aiohttp's connection, prometheus-client's histograms) against the lowest releases
## pyproject.toml allows (.ci/lowest.txt), on plain Python; `make test` runs the highest
LOWEST_VENV := .venv-lowest
EDGE_TESTS := tests/test_protocol.py tests/test_client_limits.py tests/test_pipelining.py \
	tests/test_processes.py tests/test_metrics.py tests/test_upstream.py tests/test_prometheus.py \
	tests/test_proxy.py tests/test_faults.py tests/test_clients.py tests/test_streams.py
$(LOWEST_VENV)/.installed: pyproject.toml .ci/lowest.txt
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/pip install --quiet --upgrade pip
	MODEL_GATEWAY_PURE=1 $(LOWEST_VENV)/bin/pip install --quiet -e '.[dev]' -c .ci/lowest.txt
	touch $@
test-lowest: $(LOWEST_VENV)/.installed tools
	rm -rf build/lowest && mkdir -p build/lowest
	cp -r src build/lowest/ && find build/lowest/src -name '*.so' -delete
	PYTHONPATH=$(CURDIR)/build/lowest/src MODEL_GATEWAY_EXPECT_PURE=1 \
		$(LOWEST_VENV)/bin/pytest $(PARALLEL) $(EDGE_TESTS)

clean:
	rm -rf $(VENV) $(LOWEST_VENV) build .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find src -name '*.so' -delete
