# The two commands (see README.md): `make run` and `make test`. Both set everything up
# themselves on a fresh Debian machine with Python 3.11, and are idempotent.

VENV        ?= .venv
PYTHON      ?= python3
PY          := $(VENV)/bin/python
SAMPLE      ?= tests/fixtures/sample.pcap
IDENTITY    ?= tests/fixtures/http1_identity.json
RULES       ?= tests/fixtures/sample_rules.yaml
# Debian packages the tests use as real peers and oracles.
APT_PACKAGES := tshark tcpdump redis-server dnsmasq-base iproute2 iputils-ping libpcap0.8 libcap2-bin openssl gcc nghttp2-client nghttp2-server rabbitmq-server curl python3-bpfcc linux-headers-amd64 golang-go libssl-dev prometheus influxdb
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# A whole pytest run that hangs (a teardown after a test's timeout, which fires once) is ended
# with SIGABRT, which makes pytest's faulthandler print every thread's stack, long before CI's
# 90 minutes; a normal run takes about 6.
PYTEST_BOUNDED := timeout --signal=ABRT --kill-after=30 40m

.PHONY: run test sanitize sanitize-tests sanitize-fuzz bench setup system-deps proto clean

run: setup
	$(VENV)/bin/trawl up --pcap $(SAMPLE) --identity $(IDENTITY) --rules $(RULES) --record-dir recordings

test: setup system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy -p trawl
	$(PYTEST_BOUNDED) $(VENV)/bin/pytest
	@$(MAKE) --no-print-directory sanitize

# The four C extensions built with AddressSanitizer + UBSan into build/asan/ (never over the
# in-tree builds the tests above import), then, side by side on the two cores: the tests whose
# imports reach them, and a bounded mutation fuzz of `trawl analyze --json` over every committed
# capture (TRAWL_FUZZ_SECONDS, default 180; TRAWL_FUZZ_SEED). CPython is not built with ASan, so
# the runtime is preloaded; PYTHONMALLOC=malloc gives every Python object its own red zones.
SANITIZE_ENV := LD_PRELOAD=$$(gcc -print-file-name=libasan.so) PYTHONMALLOC=malloc \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
TRAWL_FUZZ_SECONDS ?= 180

sanitize: setup system-deps
	$(PY) -m tests.sanitize.asan build
	$(SANITIZE_ENV) $(PY) -m tests.sanitize.asan verify
	@$(MAKE) --no-print-directory -j2 --output-sync=target sanitize-tests sanitize-fuzz

# --capture=sys: a sanitizer writes its report to file descriptor 2 and ends the process; under
# pytest's default fd capture that report died with it, and the run stopped with no word.
sanitize-tests:
	$(PYTEST_BOUNDED) env $(SANITIZE_ENV) $(PY) -m pytest -p tests.sanitize.plugin -q --capture=sys $$($(PY) -m tests.sanitize.asan tests)

sanitize-fuzz:
	$(SANITIZE_ENV) $(PY) -m tests.sanitize.fuzz_analyze --jobs 1 --seconds $(TRAWL_FUZZ_SECONDS)

setup: $(VENV)/.installed

# Re-installs when pyproject.toml changes; the stamp keeps the second run instant.
$(VENV)/.installed: pyproject.toml setup.py services/collector/_ring.c trawl/_calljson.c trawl/_otlpspans.c services/dissector/_express.c \
		services/dissector/_express_h2.h services/dissector/_express_redis.h services/dissector/_pbjson.h
	@# venv/ensurepip, a C compiler, Python.h, nghttp2.h and hiredis/read.h (the collector's ring reader,
	@# the JSON encoder and the dissector's compiled lane are C; the lane decodes HPACK with libnghttp2
	@# and reads RESP with libhiredis).
	@$(PYTHON) -c 'import ensurepip, venv, os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' 2>/dev/null \
		&& command -v gcc >/dev/null && [ -f /usr/include/nghttp2/nghttp2.h ] && [ -f /usr/include/hiredis/read.h ] || { \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
		python3-venv python3-dev gcc libnghttp2-dev libhiredis-dev; }
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
	@# bcc compiles the TLS uprobes (bpf/) against the running kernel's headers: a kernel that has
	@# none of its own gets its build/source links pointed at Debian's newest headers.
	@release=$$(uname -r); build=/lib/modules/$$release/build; \
	if [ ! -d $$build/include ]; then \
		headers=$$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1); \
		common=$$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1); \
		if [ -n "$$headers" ]; then \
			echo "pointing $$build at $$headers"; \
			$(SUDO) mkdir -p /lib/modules/$$release && $(SUDO) ln -sfn $$headers $$build && \
			{ [ -z "$$common" ] || $(SUDO) ln -sfn $$common /lib/modules/$$release/source; }; \
		fi; \
	fi

# Benchmarks print figures against a peer measured in the same run (tshark, tcpdump); root for capture.
bench: setup system-deps
	@command -v tcpreplay >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq tcpreplay; }
	$(PY) bench/dissect.py
	$(PY) bench/capture.py

proto: setup
	PATH=$(VENV)/bin:$$PATH $(PY) proto/generate.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
