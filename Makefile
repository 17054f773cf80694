# clipcache: `make demo` runs the whole method on the built-in demo; `make test` runs the tests.
# Both install what they need into $(VENV) first.
VENV       ?= .venv
PY         := $(VENV)/bin/python
PIPELINE   := $(VENV)/bin/pipeline
DATASET    ?= demo
DATA_ROOT  ?= data/$(DATASET)
# A real dataset defaults to OpenAI's ViT-B/16 (QuickGELU), as the papers use. The demo uses the
# demo CLIP that `make demo` pretrains on the demo world (once; every demo target shares it): a
# random-weight CLIP's features mean nothing. RECIPE: a head's paper recipe on a real dataset, the
# demo's settings (stages/recipes.py) on the demo.
ARTIFACTS  ?= $(or $(CLIPCACHE_ROOT),artifacts)
DEMO_CLIP  := $(ARTIFACTS)/demo/demo_clip.pt
MODEL      ?= $(if $(filter demo,$(DATASET)),demo,ViT-B-16)
PRETRAINED ?= $(if $(filter demo,$(DATASET)),$(DEMO_CLIP),openai)
RECIPE     ?= $(if $(filter demo,$(DATASET)),demo,paper)
FRAMES     ?= 8
LAYERS     ?= last4
HEAD       ?= tap
PARADIGM   ?= text4vis
SET        ?=
EXTRACT_ARGS ?=
TRAIN_ARGS ?=
FINETUNE_ARGS ?=
DEMO_ARGS  ?=

.PHONY: setup demo extract train finetune test test-slow bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(PY) -m pipeline.demo_run --data $(DATA_ROOT) $(DEMO_ARGS)

# extract holds what HEAD reads (its blocks, patch tokens, frames); train extracts first, so
# `make train HEAD=evl` after `make extract` adds what EVL needs (or reuses a cache that has it).
# On the demo, extract builds `make demo`'s own cache (every demo head's inputs, one cache) with
# the demo CLIP, pretraining it first if no demo ran yet; both are reused.
ifeq ($(DATASET),demo)
extract: setup
	$(PY) -m pipeline.demo_run --extract --data $(DATA_ROOT) $(DEMO_ARGS)
else
extract: setup
	$(PIPELINE) extract --dataset $(DATASET) --data-root $(DATA_ROOT) --model $(MODEL) \
	  $(if $(PRETRAINED),--pretrained $(PRETRAINED),) --frames $(FRAMES) --layers $(LAYERS) \
	  --for-head $(HEAD) $(EXTRACT_ARGS)
endif

train: extract
	$(PIPELINE) train --head $(HEAD) --dataset $(DATASET) --recipe $(RECIPE) $(foreach s,$(SET),--set $(s)) \
	  $(TRAIN_ARGS)

finetune: $(if $(filter demo,$(DATASET)),extract,setup)
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
