#!/usr/bin/env bash
# One server and two clients on this machine, talking GRPC over loopback. The server prints the
# per-round table and the final results; every process's log is in outputs/cross_silo/logs/.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-../../../.venv-fedml/bin/python}"   # the FedML environment (make fedml-env)
"$PY" -c "from fedpgp_fedml.crosssilo import free_ports, write_grpc_ipconfig as w; w('outputs/cross_silo/grpc_ipconfig.csv', free_ports(3))"
"$PY" -c "import sys; from fedpgp_fedml.crosssilo import launch_loopback as run; codes = run('cross_silo_config.yaml', 2, 'outputs/cross_silo/logs', python=sys.executable); print('exit codes', codes); raise SystemExit(max(codes))"
