# cotune: every target creates or refreshes .venv first, so each works on a fresh clone.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cotune-installed
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test lint format bench clean chromium studio-screenshots

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m cotune demo --workdir demo_out

test: $(STAMP)
	$(PY) -m pytest -q tests

# headless Chromium for tests/test_studio_browser.py (Debian's packages; Selenium drives them offline)
chromium:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver)

studio-screenshots: $(STAMP)  # the README's pictures of cotune studio, from the browser test's run
	COTUNE_STUDIO_SCREENSHOTS=docs/studio COTUNE_REQUIRE_BROWSER=1 $(PY) -m pytest -q tests/test_studio_browser.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

bench: $(STAMP)
	$(PY) -c 'import accelerate, fastapi, uvicorn, httpx' 2>/dev/null || $(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/data.py
	$(PY) bench/serve.py
	test -f demo_out/run/adapter/adapter_config.json || $(PY) -m cotune demo --workdir demo_out || true  # an adapter for the next bench
	$(PY) bench/stage_search.py
	$(PY) bench/qlora_memory.py  # cotune QLoRA vs bf16 LoRA peak memory, 1.3 B model cached under ~/.cache/cotune
	$(PY) bench/train_bench.py  # last: its last line is the LoRA throughput/memory ratio line, after the QLoRA one

clean:
	rm -rf demo_out .pytest_cache build *.egg-info
