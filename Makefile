# Everything a fresh machine needs: `make train` and `make test` create .venv on first use.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup test test-all test-transformers lint docs train clean

setup: $(STAMP)

# Re-installs only when pyproject.toml or constraints.txt changes. constraints.txt pins the tested releases
# (torch/torchvision: the releases CI tests with; its package index serves them from local disk).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

# transformers' own common model tests (ModelTesterMixin) over vitrail's classes; downloads the transformers sdist.
test-transformers: setup
	$(BIN)/python tests/transformers_common/run.py

lint: setup
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/ruff format --check src tests scripts benchmarks

# The main job: a ViT trained from scratch on the embedded digits (see docs/guides/training.md). Extra flags: ARGS="...".
DIGITS_MODEL  := image_size=8,patch_size=2,encoder_stride=2,num_channels=1,hidden_size=64,num_hidden_layers=4,$\
                 num_attention_heads=4,intermediate_size=128,pooling=mean,use_cls_token=false,layer_norm_eps=1e-6
DIGITS_RECIPE := --config_overrides $(DIGITS_MODEL) \
                 --rotation 11 --translate 0.15 --scale_jitter 0.1 --label_smoothing_factor 0.1 \
                 --num_train_epochs 150 --per_device_train_batch_size 128 --learning_rate 2e-3 --weight_decay 0.05 \
                 --lr_scheduler_type cosine --warmup_steps 0.1 --seed 0 \
                 --eval_strategy steps --eval_steps 150 --logging_steps 30 --save_strategy no \
                 --per_device_eval_batch_size 512 --report_to none --disable_tqdm true --use_cpu true
OUTPUT_DIR    ?= runs/digits

train: setup
	$(BIN)/vitrail train --output_dir $(OUTPUT_DIR) $(DIGITS_RECIPE) $(ARGS)

# The documentation site (mkdocs.yml) into site/; --strict: a broken link or API reference fails the build.
docs: setup
	$(BIN)/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache
