# The two commands of the README. Each builds (or reuses) the pinned environment first: envs/bootstrap.sh
# keeps it outside the clone, keyed by the hash of envs/requirements.txt.
SHELL := /bin/bash
VENV = $(shell bash envs/bootstrap.sh)
ENV = PATH="$(VENV)/bin:$$PATH"

.PHONY: run test test-fast dag lint bench

run:            ## the whole default DAG: submission.csv, results/metrics.md, results/ablation/*.md, results/report.html
	$(ENV) snakemake

test:           ## the whole test suite (unit, property, stage, workflow incl. a tiny end-to-end DAG run)
	bash tests/run.sh

test-fast:      ## everything but the slow tests
	$(ENV) python -m pytest -q -m "not slow and not slurm"

dag:            ## the DAG picture of the default config
	$(ENV) snakemake --rulegraph | dot -Tpng -Gdpi=70 > docs/dag.png

lint:
	$(ENV) snakemake --lint
