# Two commands on a fresh machine with Python 3.11: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# FedML pins numpy<2 and protobuf<4: its plugin is tested in a separate environment.
FEDML_VENV := .venv-fedml

.PHONY: run test env fedml-env clean

env: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-test.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/fedpgp-ray run --overwrite  # replaces the previous quickstart run in runs/quickstart

fedml-env:
	PYTHON=$(PYTHON) bash plugins/fedml/make_env.sh

# The Ray runtime tests start their own Ray instances: a separate process keeps them clear of
# Ray state left by earlier tests in the same interpreter.
RAY_SESSION_TESTS := tests/test_ray_runtime.py tests/test_restored_state.py tests/test_secagg_ray.py tests/test_stragglers_ray.py tests/test_fedbuff_ray.py
test: $(STAMP) fedml-env
	$(BIN)/python -m pytest $(addprefix --ignore=,$(RAY_SESSION_TESTS))
	$(BIN)/python -m pytest $(RAY_SESSION_TESTS)
	$(FEDML_VENV)/bin/python -m pytest plugins/fedml/tests

clean:
	rm -rf $(VENV) $(FEDML_VENV) runs mlflow.db mlartifacts mlruns .pytest_cache  # the workspace store goes with runs/
