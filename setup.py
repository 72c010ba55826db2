"""fedpgp-ray: FedPGP federated prompt learning on CLIP, with Ray, MLflow and FedML integrations."""
import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).resolve().parent


def requirements(name: str) -> list[str]:
    lines = (here / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


setup(
    name="fedpgp-ray",
    version=re.search(r'__version__ = "(.+)"', (here / "fedpgp_ray" / "__init__.py").read_text()).group(1),
    description="FedPGP (ICML 2024) federated prompt learning on frozen CLIP: Ray runtime, MLflow tracking, FedML plugin",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["fedpgp_ray", "fedpgp_ray.*"]),
    package_data={"fedpgp_ray": ["configs/*.yaml", "configs/paper/*.yaml", "clip/model_configs/*.json",
                                 "clip/weights/*"]},
    install_requires=requirements("requirements.txt"),
    extras_require={
        "test": requirements("requirements-test.txt"),
        # No "fedml" extra: FedML 0.9.6's pins (numpy<2, protobuf<4, importlib-metadata<2) do not
        # resolve beside MLflow 3. The plugin is its own package (plugins/fedml), installed in its own
        # environment by `make fedml-env`.
    },
    entry_points={"console_scripts": ["fedpgp-ray=fedpgp_ray.cli:main"]},
)
