# The two commands (see README.md): `make run` and `make test`. Both set everything up
# themselves on a fresh Debian machine with Python 3.11, and are idempotent.

VENV        ?= .venv
PYTHON      ?= python3
PY          := $(VENV)/bin/python
SAMPLE      ?= tests/fixtures/http1.pcap
IDENTITY    ?= tests/fixtures/http1_identity.json
# Debian packages the tests use as real peers and oracles.
APT_PACKAGES := tshark tcpdump redis-server dnsmasq-base iproute2 iputils-ping libpcap0.8 openssl
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test setup system-deps lint typecheck unit proto clean

run: setup
	$(VENV)/bin/trawl up --pcap $(SAMPLE) --identity $(IDENTITY)

test: setup system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy -p trawl
	$(VENV)/bin/pytest

setup: $(VENV)/.installed

# Re-installs when pyproject.toml changes; the stamp keeps the second run instant.
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3-venv python3-dev gcc; }
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# Installs only what is missing, so a machine that has everything runs no apt at all.
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

proto: setup
	PATH=$(VENV)/bin:$$PATH $(PY) proto/generate.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
