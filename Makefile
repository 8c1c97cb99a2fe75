# ferrum-gen: the two commands are `make generate SPEC=qwen3moe.yaml` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SPEC   ?= qwen3moe.yaml
OUT    ?= generated
# The GPU targets run in .venv-gpu: a venv over the interpreter that has CuPy and torch,
# with the package's own dependencies added. --system-site-packages alone does not show that
# interpreter's packages when it is itself a venv, so its site directories also go into a .pth.
GPU_PYTHON ?= python3
GPU_VENV   := .venv-gpu
GPU_STAMP  := $(GPU_VENV)/.installed
GPU_RUN    := PYTHONPATH=$(CURDIR) $(GPU_VENV)/bin/python
# Machines with no package index get wheels in .whl/ (scripts/device-run.sh): pip uses those alone.
PIP_SOURCE ?= $(if $(wildcard .whl/*.whl),--no-index --find-links=.whl,)

.PHONY: venv gpu-venv generate generate-all test demo demo-cpu demo-gpu doctor gpu-test gpu-memcheck bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(STAMP)

# Only the dependencies are installed (the package runs from this checkout through
# PYTHONPATH), so no build backend is needed where there is no package index. cuda-bindings
# (programmatic dependent launch, ferrum_gen/launch.py) is optional: without it, plain launches.
$(GPU_STAMP): pyproject.toml scripts/requirements.py
	$(GPU_PYTHON) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_PYTHON) -c "import site; print(*site.getsitepackages(), sep='\n')" \
	  > "$$($(GPU_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/gpu-python.pth"
	$(GPU_PYTHON) scripts/requirements.py > $(GPU_VENV)/requirements.txt
	echo "pytest>=8" >> $(GPU_VENV)/requirements.txt
	$(GPU_VENV)/bin/python -m pip install --quiet $(PIP_SOURCE) -r $(GPU_VENV)/requirements.txt
	$(GPU_VENV)/bin/python -m pip install --quiet $(PIP_SOURCE) cuda-bindings \
	  || echo "cuda-bindings not installed: the grouped path runs without programmatic dependent launch"
	touch $@

gpu-venv: $(GPU_STAMP)

generate: $(STAMP)
	$(BIN)/ferrum-gen generate --spec $(SPEC) --out $(OUT)

generate-all: $(STAMP)
	$(BIN)/ferrum-gen generate --all --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest tests

# A small qwen3moe-shaped model end to end: on the GPU where CuPy finds a usable one
# (run from .venv-gpu there), else the CPU reference and the nvcc compile check.
demo: $(if $(shell $(GPU_PYTHON) -c "import cupy" 2>/dev/null && echo gpu),demo-gpu,demo-cpu)

demo-cpu: $(STAMP)
	$(BIN)/ferrum-gen demo

demo-gpu: $(GPU_STAMP)
	$(GPU_RUN) -m ferrum_gen.cli demo --gpu require

doctor: $(STAMP)
	$(BIN)/ferrum-gen doctor

gpu-test: $(GPU_STAMP)
	$(GPU_RUN) -m pytest -m gpu tests $(PYTEST_ARGS)

# compute-sanitizer memcheck over the GPU suite for the tiny and qwen3moe specs. API errors are
# not reported: cuda-bindings probes the driver for every entry point it knows with
# cuGetProcAddress, and a driver older than the bindings answers "invalid value" for the newer
# ones (kernel memory errors still fail the run).
gpu-memcheck: $(GPU_STAMP)
	FERRUM_TEST_NO_MEMPOOL=1 PYTHONPATH=$(CURDIR) compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 99 \
	  $(GPU_VENV)/bin/python -m pytest -q -m gpu tests/test_gpu.py -k "tiny or (qwen3moe and not qwen3moe_235b)" \
	  -p no:cacheprovider $(PYTEST_ARGS)

# Times the layer on the GPU against the card's floors (torch, when installed, adds its baseline):
# writes bench-<spec>.json; e.g. make bench BENCH_ARGS="--plot bench.png --compare old.json".
bench: $(GPU_STAMP)
	$(GPU_RUN) -m ferrum_gen.cli bench --spec $(basename $(SPEC)) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(GPU_VENV) .pytest_cache build *.egg-info
