"""setuptools' build backend, refusing to build where the real `azureml-core` is installed.

pip builds in an isolated environment, so the check asks the interpreter that runs pip (sys.executable) with the
build environment's paths removed: that is the environment the package is about to be installed into.
"""

from __future__ import annotations

import os
import subprocess
import sys

from setuptools import build_meta as _orig

CONFLICT = (
    "runwatch-azureml provides the `azureml.core` package, and the real azureml-core (Microsoft's) is installed "
    "in {prefix}. Installing both would overwrite one with the other. Use a separate virtual environment for "
    "runwatch-azureml, or `pip uninstall azureml-core` first."
)

_PROBE = (
    "import importlib.metadata as m, sys\n"
    "try:\n    m.distribution('azureml-core')\nexcept m.PackageNotFoundError:\n    sys.exit(0)\n"
    "print(sys.prefix); sys.exit(3)\n"
)


def _refuse_if_azureml_core() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True)
    if probe.returncode == 3:
        raise SystemExit("error: " + CONFLICT.format(prefix=probe.stdout.strip() or sys.prefix))


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _refuse_if_azureml_core()
    return _orig.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _refuse_if_azureml_core()
    return _orig.build_editable(wheel_directory, config_settings, metadata_directory)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _refuse_if_azureml_core()
    return _orig.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


get_requires_for_build_wheel = _orig.get_requires_for_build_wheel
get_requires_for_build_editable = _orig.get_requires_for_build_editable
get_requires_for_build_sdist = _orig.get_requires_for_build_sdist
prepare_metadata_for_build_editable = _orig.prepare_metadata_for_build_editable
build_sdist = _orig.build_sdist
