# loupe developer entry points. `make demo` and `make test` install into .venv/ on first use.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export GLIBC_TUNABLES := glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296

.PHONY: demo test test-fast soak protos image clean

# the thin client first: the server's `loupe-client==X` requirement is met by it (it is on no index)
$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e clients/python
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/loupe demo

# The multi-node test runs in a pytest process of its own (marker `isolated`): twice a long suite
# process died with SIGSEGV exactly there (no Python stack: something replaced faulthandler's
# handler), after ~20 local Ray start/stop cycles and with the Helm Go SDK (a Go c-shared library)
# loaded in the same process. Apart, it starts from a clean process and cannot take the run down.
# Two pytest workers, one test module at a time each (`--dist loadfile`: a module's cluster fixture
# stays in one process): most integration time is waiting on servers, Ray and subprocesses, so on
# 2 cores the run takes ~0.8x its one-process time (BENCHMARKS.md, "The test suite").
test: $(STAMP)
	$(VENV)/bin/ruff check --quiet .
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --max-worker-restart 0 --durations=15 -m "not soak and not isolated" tests
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m "isolated and not soak" tests

soak: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m soak tests

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow and not soak" tests

protos: $(STAMP)
	scripts/gen_protos.sh $(VENV)/bin/python

# the container image with a CPU-only torch (scripts/build_image.sh documents IMAGE, BUILDER,
# BASE_IMAGE, DEBOOTSTRAP_BASE, WHEELS_DIR, TORCH_CPU_INDEX, PIP_CERT_FILE)
image:
	scripts/build_image.sh

clean:
	rm -rf $(VENV) loupe-data
