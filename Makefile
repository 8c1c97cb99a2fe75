# ferrum-gen: the two commands are `make generate SPEC=qwen3moe.yaml` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SPEC   ?= qwen3moe.yaml
OUT    ?= generated
# The GPU suite runs under an interpreter that has CuPy (on the GPU machines: the system python3).
GPU_PYTHON ?= python3

.PHONY: venv generate generate-all test gpu-test gpu-memcheck bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(STAMP)

generate: $(STAMP)
	$(BIN)/ferrum-gen generate --spec $(SPEC) --out $(OUT)

generate-all: $(STAMP)
	$(BIN)/ferrum-gen generate --all --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest tests

gpu-test:
	$(GPU_PYTHON) -m pytest -m gpu tests $(PYTEST_ARGS)

# compute-sanitizer memcheck over the GPU suite for the tiny and qwen3moe specs.
gpu-memcheck:
	FERRUM_TEST_NO_MEMPOOL=1 compute-sanitizer --tool memcheck --error-exitcode 99 \
	  $(GPU_PYTHON) -m pytest -q -m gpu tests/test_gpu.py -k "tiny or (qwen3moe and not qwen3moe_235b)" \
	  -p no:cacheprovider $(PYTEST_ARGS)

# Times the layer on the GPU against the card's floors (torch, when installed, adds its baseline):
# writes bench-<spec>.json; e.g. make bench BENCH_ARGS="--plot bench.png --compare old.json".
bench:
	$(GPU_PYTHON) -m ferrum_gen.cli bench --spec $(SPEC) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
