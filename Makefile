# The two commands of the README: `make demo` (offline, embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TRITON ?= triton==3.7.1
PY := $(VENV)/bin/python

.PHONY: demo test install clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" "$(TRITON)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/ssdd bench --quick

# Two processes: OpenVINO's native threads make a later fork in the same process crash (tests/conftest.py).
test: install
	$(PY) -m pytest -q tests -m "not openvino"
	$(PY) -m pytest -q tests -m openvino

clean:
	rm -rf $(VENV) build *.egg-info
