# Two entry points: `make studio` runs the product, `make test` runs the suite.
# Both create .venv if missing and install what they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: studio test setup setup-test lint clean clip-model leaderboard

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first: on a CPU machine the pinned CPU build, so that the project's loose
# torch requirement never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
ifeq ($(HAS_CUDA),1)
	$(BIN)/python -m pip install --quiet torch
else
	$(BIN)/python -m pip install --quiet torch==2.13.0
endif
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/image-gen setup
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	touch $@

setup: $(STAMP)

setup-test: $(TEST_STAMP)

studio: $(STAMP)
	$(BIN)/image-gen serve

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The evaluation suite's in-house CLIP (600 steps of 1 to 12 s on one thread, as busy as the machine is) and its
# section of the model card.
CLIP_RUN ?= runs/clip
clip-model: $(STAMP)
	OMP_NUM_THREADS=1 nice -n 15 $(BIN)/image-gen train clip --run-dir $(CLIP_RUN) --out eval/models/inhouse-clip
	$(BIN)/python -m eval.clip_accuracy --model-card docs/model-card.md

# The committed leaderboard (docs/leaderboard/): the bundled teacher at 25 and 10 steps (its sampler, Euler
# ancestral) and at 25 steps with DPM++ 2M (the sampler it replaced), the distilled student at 1, 2, 4 and 8 steps,
# all on the built-in suite. Results stay in docs/leaderboard/results for the regression gate.
LEADERBOARD_DIR ?= docs/leaderboard
leaderboard: $(STAMP)
	for steps in 25 10; do \
	  $(BIN)/image-gen eval --model inhouse-shapes --steps $$steps --out $(LEADERBOARD_DIR)/results || exit 1; done
	$(BIN)/image-gen eval --model inhouse-shapes --scheduler dpmpp_2m --steps 25 --out $(LEADERBOARD_DIR)/results
	for steps in 1 2 4 8; do \
	  $(BIN)/image-gen eval --model inhouse-shapes-lcm --steps $$steps --out $(LEADERBOARD_DIR)/results || exit 1; done
	$(BIN)/image-gen leaderboard --results $(LEADERBOARD_DIR)/results --out $(LEADERBOARD_DIR)

clean:
	rm -rf $(VENV) data
