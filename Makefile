# Everything a fresh Debian 12 machine needs, as root:
#   make demo   - set up, then run the demonstration
#   make test   - set up, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: host venv test test-fast test-compat demo bpf bpf-check bench bench-restarts bench-outcomes vm-test clean

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

# The tests that need neither root nor BPF (marked automatically: tests/conftest.py).
test-fast: venv
	$(PY) -m pytest -m "not kernel" -q $(PYTEST_ARGS)

# The gunicorn and uvicorn suites against the oldest and the newest versions
# the extras allow (tox.ini compat-oldest, compat-newest; ~4 minutes each).
test-compat: host venv bpf-check
	$(PY) -m pip install -q 'tox>=4.20'
	$(VENV)/bin/tox -e compat-oldest,compat-newest -- $(PYTEST_ARGS)

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

# What counting outcomes costs: CPU per request with and without the recording wrapper (about 4 minutes;
# writes bench/results/outcomes.json).  No root needed.
bench-outcomes: venv
	$(PY) bench/outcomes.py $(BENCH_ARGS)

# The VM checks (scripts/vm/): Debian 12's kernel 6.1 with systemd as PID 1, the
# kernel tests and the documented systemd deployment under load.  The image is
# built once and cached; results in build/vm-test/.
vm-test: venv
	@bash scripts/setup-host.sh --vm
	PYTHON=$(PY) bash scripts/vm/run-vm.sh

clean:
	rm -rf $(VENV) build dist .tox *.egg-info
