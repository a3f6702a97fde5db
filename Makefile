# The two commands of the README: `make demo` (offline, embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TRITON ?= triton==3.7.1
PY := $(VENV)/bin/python

.PHONY: demo test install install-eval test-eval docs clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" "$(TRITON)"
	$(PY) -m pip install -q -e ".[test]"
	# ssdd serve: the tritonserver that nvidia-pytriton bundles, without PyTriton's numpy<2 pin (its Python side is
	# not used), and tritonclient's HTTP client
	$(PY) -m pip install -q --no-deps "nvidia-pytriton==0.7.0"
	$(PY) -m pip install -q "tritonclient[http,grpc]>=2.50"
	touch $@

install: $(VENV)/.installed

# ssdd eval's metric libraries (torch-fidelity, lpips) import torchvision, and PyPI's torchvision pins its own torch:
# it does not import beside the main venv's torch 2.13.0 CPU build. So the tests marked `eval` run in a second venv
# with torch 2.14.1 + torchvision 0.29.1 (CUDA build, ~5.5 GB, taken from the local wheel store), which only they
# use; the main venv and `[all]` stay on torch 2.13.0. Cost measured in docs/guides/evaluate.md.
EVAL_VENV ?= .venv-eval
EVAL_TORCH ?= torch==2.14.1 torchvision==0.29.1
EVAL_PY := $(EVAL_VENV)/bin/python

$(EVAL_VENV)/.installed: setup.py
	$(PYTHON) -m venv $(EVAL_VENV)
	$(EVAL_PY) -m pip install -q $(EVAL_TORCH)
	$(EVAL_PY) -m pip install -q -e ".[eval,diffusers]" pytest
	touch $@

install-eval: $(EVAL_VENV)/.installed

# Only tests/test_eval.py: the other test files import the main venv's packages (onnx, openvino...) at collection.
test-eval: install-eval
	$(EVAL_PY) -m pytest -q -p no:xdist tests/test_eval.py -m eval

demo: install
	$(VENV)/bin/ssdd bench --quick

# Two runs: OpenVINO's native threads make a later fork in the same process crash (tests/conftest.py).
# Each run uses JOBS pytest-xdist workers, one test file per worker (module fixtures such as the ONNX exports
# are built once): most of the suite is single-threaded Python (tracing, exporting, compiling), so two workers
# fill two cores. JOBS=0 runs in this process, without xdist.
JOBS ?= 2
XDIST = $(if $(filter 0,$(JOBS)),-p no:xdist,-n $(JOBS) --dist loadfile)
# .venv-eval is installed in the background while the main runs go (pip mostly unpacks wheels; measured ~2.5 min
# alone), then its tests run; make test fails if any of the three runs failed.
test: install
	@( $(MAKE) --no-print-directory install-eval > $(EVAL_VENV)-install.log 2>&1 ) & eval_install=$$!; rc=0; \
	$(PY) -m pytest -q tests -m "not openvino and not eval" $(XDIST) --durations=15 || rc=1; \
	$(PY) -m pytest -q tests -m "openvino and not eval" $(XDIST) --durations=5 || rc=1; \
	if ! wait $$eval_install; then cat $(EVAL_VENV)-install.log; echo "make test: installing $(EVAL_VENV) failed"; exit 2; fi; \
	$(MAKE) --no-print-directory test-eval || rc=1; \
	exit $$rc

# The documentation site (docs/, mkdocs.yml) on 127.0.0.1:8000; `make test` builds it with --strict.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve -a 127.0.0.1:8000

clean:
	rm -rf $(VENV) $(EVAL_VENV) $(EVAL_VENV)-install.log build site *.egg-info
