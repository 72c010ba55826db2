"""Telemetry is off unless the user opts in: MLflow 3 telemetry and Ray usage stats."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = ("import fedpgp_ray, mlflow\n"
         "from mlflow.telemetry.utils import is_telemetry_disabled\n"
         "from ray._common.usage.usage_lib import usage_stats_enabled\n"
         "print(is_telemetry_disabled(), usage_stats_enabled())")


def _probe(tmp_path, **env) -> str:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "RAY_USAGE_STATS_ENABLED", "CI")
             and not k.startswith("PYTEST")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, "HOME": str(tmp_path), **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[-2:]


@pytest.mark.parametrize("env, expected", [
    ({}, ["True", "False"]),                                   # off by default
    ({"RAY_USAGE_STATS_ENABLED": "1"}, ["True", "True"]),      # the user opts in to Ray's
])
def test_telemetry_is_off_unless_the_user_opts_in(tmp_path, env, expected):
    assert _probe(tmp_path, **env) == expected


def test_mlflow_telemetry_opt_in_is_respected(tmp_path):
    # MLflow disables telemetry under CI/test markers itself; the variable we set must not be forced on
    code = "import os, fedpgp_ray; print(os.environ['MLFLOW_DISABLE_TELEMETRY'])"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "false"},
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "false"
