"""Build settings pyproject.toml cannot state: builds happen in a temporary directory, so
`pip wheel` / `pip install` leave the checkout as it was (no build/, no *.egg-info). The
metadata is in pyproject.toml."""
import atexit
import shutil
import tempfile

from setuptools import setup

scratch = tempfile.mkdtemp(prefix="fedpgp-ray-build-")
atexit.register(shutil.rmtree, scratch, ignore_errors=True)
setup(options={"build": {"build_base": f"{scratch}/build"}, "egg_info": {"egg_base": scratch}})
