# Two commands do all set-up on a fresh machine: `make demo` and `make test`. Both create .venv when missing and
# install everything once (a stamp file makes a second run install nothing).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU-only machines: DeepSpeed's CPU accelerator (gloo). A GPU machine leaves DeepSpeed to auto-detect.
ifeq ($(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu),)
export DS_ACCELERATOR ?= cpu
endif
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
PYTEST_ARGS ?=

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing chatrlhf and its dependencies into $(VENV) (torch pinned by constraints.txt)..."
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]' 2>&1 \
	  | grep -v "is ignored: it is neither a file nor a directory" || true
	@$(BIN)/python -c "import chatrlhf, torch, deepspeed, transformers" >/dev/null 2>&1 \
	  || { echo "install failed: see pip output above"; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/chatrlhf demo --output_dir demo_out

bench: $(STAMP)
	$(BIN)/chatrlhf bench

clean:
	rm -rf demo_out runs .pytest_cache .torch_extensions
