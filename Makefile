# The two commands the README opens with, each doing its own setup first:
#   make demo   pretrain -> k-NN -> export on the embedded default data (minutes on CPU)
#   make test   the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: setup demo test bench clean system-packages

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	@# Without ../shared/data, the demo uses Debian's Open Clip Art drawings: install them when we can.
	@if [ ! -f ../shared/data/imagenette/dataset.json ] && [ ! -d /usr/share/openclipart/png ] \
	    && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openclipart-png) || true; fi
	$(PY) -m ssl_container demo --overwrite

test: setup system-packages
	$(PY) -m pytest -q -rs --durations=25 -n 2 --dist loadfile

# What the Slurm tests (a real single-node cluster: slurmctld, slurmd, munge, slurmdbd + MariaDB) and the
# demo's fallback data need from Debian. Installed when we are root with apt; otherwise the list of what
# is missing is printed and those tests skip, each with its reason (pytest -rs lists them at the end).
SYSTEM_PACKAGES := slurmctld slurmd slurm-client munge slurmdbd mariadb-server openclipart-png dataset-fashion-mnist
system-packages:
	@missing=""; for pkg in $(SYSTEM_PACKAGES); do dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages for the Slurm tests and the demo:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else \
	  echo "not root or no apt-get: missing Debian packages$$missing; the tests that need them will skip (see the summary)"; \
	fi

bench: setup
	$(PY) benchmarks/model_flops.py

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
