# spear_rt: the two commands a fresh machine needs are `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo demo-voice test install install-test serve lint bench-realtime clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e '.[local-asr,uvloop,llama,whisper]'

install-test: $(BIN)/python
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  echo "installing espeak-ng (used by tests that synthesize speech)"; \
	  (apt-get update -qq && apt-get install -y -qq espeak-ng) >/dev/null 2>&1 || \
	  echo "warning: could not install espeak-ng; its tests will fail"; }
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium (the browser tests drive it through Playwright)"; \
	  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || \
	  echo "warning: could not install chromium; the browser tests will fail"; }
	@command -v clang >/dev/null 2>&1 && [ -d /usr/include/wasm32-wasi ] || { \
	  echo "installing clang, lld and wasi-libc (the tests compile C guests to wasm32-wasi)"; \
	  (apt-get update -qq && apt-get install -y -qq clang lld wasi-libc libclang-rt-14-dev-wasm32) \
	    >/dev/null 2>&1 || echo "warning: could not install clang/wasi-libc; the C guest tests will fail"; }
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (the cluster tests start one on 127.0.0.1)"; \
	  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null 2>&1 || \
	  echo "warning: could not install redis-server; the cluster tests will fail"; }
	$(BIN)/pip install -q -e '.[test,uvloop,llama,whisper]'
	@command -v npm >/dev/null 2>&1 && npm ci --no-audit --no-fund --prefix tests/node >/dev/null || \
	  echo "warning: npm ci --prefix tests/node failed; the Node SDK tests will fail"

## Start a server on the embedded default and stream the fixtures through it (live transcript).
demo: install
	$(BIN)/spear-rt demo

## Start a server on the embedded default and talk to it: fixtures as spoken turns, answers, latencies.
demo-voice: install
	$(BIN)/spear-rt demo-voice

## Install everything the tests need and run the whole suite.
test: install-test
	$(BIN)/python -m pytest -q

serve: install
	$(BIN)/spear-rt serve

lint: install-test
	$(BIN)/pip install -q ruff mypy
	$(BIN)/ruff check spear_rt spear_rt_backends tests bench
	$(BIN)/mypy spear_rt

bench-realtime: install
	$(BIN)/pip install -q psutil
	$(BIN)/python bench/realtime_load.py --loop asyncio --backend stub --sessions 50,100,200 --seconds 10

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
