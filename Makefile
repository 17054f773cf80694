# clipcache: `make demo` runs the whole method on the built-in demo; `make test` runs the tests.
# Both install what they need into $(VENV) first.
VENV       ?= .venv
PY         := $(VENV)/bin/python
PIPELINE   := $(VENV)/bin/pipeline
DATASET    ?= demo
DATA_ROOT  ?= data/$(DATASET)
# The demo runs on a small built-in model (random init, 12 blocks, so every head fits); a real
# dataset defaults to OpenAI's ViT-B/16 (QuickGELU), as the papers use.
MODEL      ?= $(if $(filter demo,$(DATASET)),small,ViT-B-16)
PRETRAINED ?= $(if $(filter demo,$(DATASET)),,openai)
FRAMES     ?= 8
LAYERS     ?= last4
HEAD       ?= tap
PARADIGM   ?= text4vis
SET        ?=
EXTRACT_ARGS ?=
TRAIN_ARGS ?=
FINETUNE_ARGS ?=

.PHONY: setup demo extract train finetune test test-slow bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(PY) -m pipeline.demo_run

# extract holds what HEAD reads (its blocks, patch tokens, frames); train extracts first, so
# `make train HEAD=evl` after `make extract` adds what EVL needs (or reuses a cache that has it).
extract: setup $(if $(filter demo,$(DATASET)),$(DATA_ROOT)/classes.txt,)
	$(PIPELINE) extract --dataset $(DATASET) --data-root $(DATA_ROOT) --model $(MODEL) \
	  $(if $(PRETRAINED),--pretrained $(PRETRAINED),) --frames $(FRAMES) --layers $(LAYERS) \
	  --for-head $(HEAD) $(EXTRACT_ARGS)

train: extract
	$(PIPELINE) train --head $(HEAD) --dataset $(DATASET) $(foreach s,$(SET),--set $(s)) $(TRAIN_ARGS)

# the demo's videos, when `make extract DATASET=demo` finds none
$(DATA_ROOT)/classes.txt: | setup
	$(PIPELINE) demo-data --out $(DATA_ROOT)

finetune: setup
	$(PIPELINE) finetune --paradigm $(PARADIGM) --dataset $(DATASET) --data-root $(DATA_ROOT) --model $(MODEL) \
	  $(if $(PRETRAINED),--pretrained $(PRETRAINED),) --frames $(FRAMES) $(foreach s,$(SET),--set $(s)) $(FINETUNE_ARGS)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) bench/bench_extract.py

clean:
	rm -rf artifacts data/demo
