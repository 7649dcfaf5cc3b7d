# One entry point for set-up, the main job, tests and benchmarks. The environment (.venv) is made on
# first use from the pinned lock, so `make run` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# checkov (CloudFormation policy checks) pins boto3 1.35, which conflicts with the project's boto3: own venv
CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed
# The Spark that EMR Serverless runs our jobs on (compute stack's EmrReleaseLabel emr-spark-8.0.0 = Apache Spark
# 4.0.2): its pyspark over the project's environment (a .pth adds .venv's site-packages after its own), so the jobs
# are tested on it too (tests/pipeline/orchestration/test_emr_spark_release.py)
EMR_SPARK_VERSION := 4.0.2
EMR_SPARK_VENV := .venv-emr-spark
EMR_SPARK_STAMP := $(EMR_SPARK_VENV)/.installed-$(EMR_SPARK_VERSION)
export PYTHONHASHSEED := 0
export RECSYS_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: venv run ui test lint typecheck fmt bench-train bench-train-ddp bench-ease bench-build bench-infer bench-cold bench-recs bench-topk-target experiment results backfill clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@start=$$(date +%s); \
	$(PY) -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[dev]' && \
	echo "environment ready in $$(( $$(date +%s) - start )) s"
	@touch $(STAMP)

$(CHECKOV_STAMP): tools/checkov.lock
	@test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q --disable-pip-version-check -c tools/checkov.lock checkov
	@touch $(CHECKOV_STAMP)

$(EMR_SPARK_STAMP): $(STAMP)
	rm -rf $(EMR_SPARK_VENV) && $(PYTHON) -m venv $(EMR_SPARK_VENV)
	$(EMR_SPARK_VENV)/bin/python -m pip install -q --disable-pip-version-check pyspark==$(EMR_SPARK_VERSION)
	echo "import site; site.addsitedir('$(CURDIR)/$(VENV)/lib/python3.11/site-packages')" \
		> $(EMR_SPARK_VENV)/lib/python3.11/site-packages/zz_recsys_main_venv.pth
	$(EMR_SPARK_VENV)/bin/python -c "import pyspark, pipeline; assert pyspark.__version__ == '$(EMR_SPARK_VERSION)', pyspark.__version__"
	@touch $(EMR_SPARK_STAMP)

# The main job on the embedded default: synthetic events → weekly DAG → daily DAG (pipeline/orchestration/dev/story.py).
# One screen of output; Airflow's and the jobs' logs go to RECSYS_HOME/logs/make-run.log.
run: venv
	@RECSYS_HOME=$${RECSYS_HOME:-$(CURDIR)/out/home} $(PY) -m pipeline.orchestration.dev.story

# The MLflow UI and the Airflow UI on 127.0.0.1 over `make run`'s stores (pipeline/orchestration/dev/ui.py), until
# Ctrl-C; e.g. `make ui ARGS="--mlflow-port 5001 --airflow-port 8081"`.
ui: venv
	@RECSYS_HOME=$${RECSYS_HOME:-$(CURDIR)/out/home} $(PY) -m pipeline.orchestration.dev.ui $(ARGS)

# The accuracy experiment on synthetic data (a results table): what `make run` did before the pipeline existed.
experiment: venv
	$(VENV)/bin/recsys experiment --dataset synthetic --models popularity,ease,multivae,multivae-pia \
		--seeds 2 --epochs 15 --out out/experiment

test: venv lint $(CHECKOV_STAMP) $(EMR_SPARK_STAMP)
	$(PY) -m model.topk  # compile the numba top-k once, before tests start workers that would each compile it
	PATH="$$PATH:$(CURDIR)/$(CHECKOV_VENV)/bin" $(PY) -m pytest -q

# ruff over the whole repo (the rules are pyproject's [tool.ruff]; .venv and git-ignored paths are skipped), then mypy.
# The same two checks run as pre-commit hooks (.pre-commit-config.yaml; see CONTRIBUTING.md).
lint: venv
	$(VENV)/bin/ruff check .
	@$(MAKE) --no-print-directory typecheck

# mypy over model/ and pipeline/ (pyproject's [tool.mypy]: packages, pydantic plugin, check_untyped_defs).
typecheck: venv
	$(VENV)/bin/mypy

# Safe automatic fixes only: import sorting (rule I) and ruff's other safe fixes (unused imports, pyupgrade, ...).
# Deliberately not `ruff format`: the tree is not ruff-formatted (hand-wrapped, aligned lines), and reformatting it
# would bury every real change under a whole-tree diff. Review the result with `git diff`.
fmt: venv
	$(VENV)/bin/ruff check --fix .

bench-train: venv
	$(PY) -m bench.train_epoch $(ARGS)

bench-train-ddp: venv
	$(PY) -m bench.train_ddp $(ARGS)

bench-ease: venv
	$(PY) -m bench.ease_fit $(ARGS)

bench-build: venv
	$(PY) -m bench.build_matrix $(ARGS)

bench-infer: venv
	$(PY) -m bench.infer $(ARGS)

bench-cold: venv
	$(PY) -m bench.cold_items $(ARGS)

bench-recs: venv
	$(PY) -m bench.recs_lookup $(ARGS)

# the numba top-k compiled for the host vs the images' pinned target (pipeline/io/numba_target.py)
bench-topk-target: venv
	$(PY) -m bench.topk_target --append $(ARGS)

# docs/results.md: the committed accuracy table (see docs/results.md for what each run used).
results: venv
	bash bench/results.sh

# A date range through a local Airflow (scheduler + dag-processor + api-server on 127.0.0.1, home under
# RECSYS_HOME/airflow), e.g. `make backfill START=2026-01-01 END=2026-01-07 [DAG=weekly_train]
# [ARGS="--timeout 3600 --max-active-runs 1"]`.
backfill: venv
	@test -n "$(START)" -a -n "$(END)" || { echo "usage: make backfill START=YYYY-MM-DD END=YYYY-MM-DD [DAG=daily_inference]" >&2; exit 2; }
	$(PY) -m pipeline.orchestration.dev.local_airflow backfill --dag '$(or $(DAG),daily_inference)' --start '$(START)' --end '$(END)' $(ARGS)

clean:
	rm -rf $(VENV) $(EMR_SPARK_VENV) out .pytest_cache .mypy_cache .ruff_cache
