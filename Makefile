# The two commands the README opens with, each doing its own setup first:
#   make demo   pretrain -> k-NN -> export on the embedded default data (minutes on CPU)
#   make test   the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(PY) -m ssl_container demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/model_flops.py

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
