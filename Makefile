# Two entry points on a fresh machine: `make demo` and `make test`.
# Both create .venv, install onerec with its dependencies (keeping whatever torch build is
# installed, or the registry's torch==2.13.0 when none is), then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
DEMO_OUT ?= runs/demo

.PHONY: venv demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24" setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	@# Pin the torch that is now installed so no dependency can swap it for another build.
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt "triton>=3.0" ninja
	@# deepspeed ships as a source package whose setup imports torch: build it against ours.
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt --no-build-isolation -e ".[test,triton]"
	touch $@

demo: venv
	ONEREC_NO_PROGRESS=$${ONEREC_NO_PROGRESS:-0} $(VENV)/bin/onerec pipeline --config configs/demo.yaml run.out_dir=$(DEMO_OUT)

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
