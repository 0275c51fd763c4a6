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
	@# Without ../shared/data, the demo uses Debian's Fashion-MNIST: install it when we can.
	@if [ ! -f ../shared/data/imagenette/dataset.json ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
	    && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) || true; fi
	$(PY) -m ssl_container demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/model_flops.py

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
