"""fedpgp-ray: FedPGP federated prompt learning on frozen CLIP, with Ray, MLflow and FedML integrations."""
import os as _os

__version__ = "0.1.0"

# Telemetry is off unless the user opts in (docs/TRACKING.md, "Telemetry"): MLflow 3 reports usage
# to an outside service and Ray collects usage stats by default. Set before mlflow or ray is
# imported (both read the variable then); a value the user set, e.g. RAY_USAGE_STATS_ENABLED=1, wins.
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
_os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
