# Everything a fresh Debian/Ubuntu machine needs, as root:
#   make demo   - set up, then run the demonstration
#   make test   - set up, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: host venv test demo bpf bpf-check bench bench-restarts clean

host:
	@bash scripts/setup-host.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: host venv bpf-check
	$(PY) -m pytest $(PYTEST_ARGS)

demo: host venv
	$(VENV)/bin/reuseport-standby demo

bpf:
	$(MAKE) -C bpf

bpf-check:
	@$(MAKE) --no-print-directory -C bpf check

bench: host venv
	$(PY) bench/loader.py --bcc

# Restarts under load against the alternatives (about 6 minutes; writes bench/results/restarts-*.{json,md,png}).
# More: BENCH_ARGS="--server uvicorn"; bench/restarts.py --help.
bench-restarts: host venv
	$(PY) bench/restarts.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
