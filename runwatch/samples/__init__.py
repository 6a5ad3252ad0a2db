"""The sample training `runwatch demo` submits (train.py), installed with runwatch: `SAMPLES` is its directory."""

from pathlib import Path

SAMPLES = str(Path(__file__).resolve().parent)
