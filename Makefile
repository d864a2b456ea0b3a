# dimo-lightning: `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install test test-all lint format demo text bench assets clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the package with pinned torch (idempotent)

test: install ## Run the test suite (CPU, the fast set: not slow, not gpu)
	$(BIN)/pytest -q -m "not slow and not gpu"

test-all: install ## Run every CPU test, slow ones included
	$(BIN)/pytest -q -m "not gpu"

lint: install ## Ruff lint
	$(BIN)/ruff check dimo_lightning tests scripts examples

format: install ## Ruff format and import sorting
	$(BIN)/ruff check --fix --select I dimo_lightning tests scripts examples
	$(BIN)/ruff format dimo_lightning tests scripts examples

demo: install ## The main job: distill the MNIST teacher on CPU and print the evaluation table
	$(BIN)/dimo fit --config configs/mnist/dimo.yaml

text: install ## The text job: distill the shipped Bible MDLM on CPU and print the text table
	$(BIN)/dimo fit --config configs/text/dimo.yaml

bench: install ## The CPU benchmark of the MNIST config (one thread): prints the tables, writes docs/bench_cpu.json
	OMP_NUM_THREADS=1 $(BIN)/dimo bench --config configs/mnist/dimo.yaml --output docs/bench_cpu.json

assets: install ## Rebuild the shipped assets (codebook, classifier, stroke autoencoder, caption cuts, teachers, text judge)
	$(BIN)/python scripts/build_assets.py codebook
	$(BIN)/python scripts/build_assets.py classifier
	$(BIN)/python scripts/build_assets.py dae
	$(BIN)/python scripts/build_assets.py captions
	$(BIN)/dimo fit --config configs/mnist/teacher.yaml --trainer.logger.init_args.name=mnist_teacher_assets
	$(BIN)/python scripts/build_assets.py teacher "$$(ls -d runs/mnist_teacher_assets/version_* | sort -V | tail -1)"
	$(BIN)/dimo fit --config configs/mnist/t2i_teacher.yaml --trainer.logger.init_args.name=mnist_t2i_teacher_assets
	$(BIN)/python scripts/build_assets.py t2i_teacher "$$(ls -d runs/mnist_t2i_teacher_assets/version_* | sort -V | tail -1)"
	$(BIN)/python scripts/build_assets.py text_tokenizer
	$(BIN)/dimo fit --config configs/text/teacher.yaml --trainer.logger.init_args.name=text_teacher_assets
	$(BIN)/python scripts/build_assets.py text_teacher "$$(ls -d runs/text_teacher_assets/version_* | sort -V | tail -1)"
	$(BIN)/dimo fit --config configs/text/judge.yaml --trainer.logger.init_args.name=text_judge_assets
	$(BIN)/python scripts/build_assets.py text_judge "$$(ls -d runs/text_judge_assets/version_* | sort -V | tail -1)"
	$(BIN)/python scripts/build_assets.py text_reference

clean: ## Remove the virtual environment and run outputs
	rm -rf $(VENV) runs lightning_logs .pytest_cache .ruff_cache *.egg-info
