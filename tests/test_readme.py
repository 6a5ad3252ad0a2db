"""Every Python code block of the README runs as written, in order, as one script (a later block uses what an
earlier one made, as a reader following the page does), against the real embedded stack, from a fresh
directory. The README's shell blocks are the set-up itself: `./dev test` is what CI runs (.ci/run), and the
`pip install` lines are what tests/test_packaging.py installs (the light wheel, runwatch-azureml)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT

BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks() -> list[str]:
    return BLOCK.findall((ROOT / "README.md").read_text())


def test_every_python_block_of_the_readme_runs_as_written(stack_env, tmp_path):
    blocks = python_blocks()
    assert len(blocks) >= 3, "the README's examples were not found"
    script = "\n\n".join(blocks)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MPLBACKEND"] = "Agg"
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    text = out.stdout
    assert "'optimizer': 'adam'" in text and "'roc': {'fpr': [0.1], 'tpr': [0.7]}" in text  # print(get_metrics())
    assert "[rank 0]" in text and "[rank 1]" in text and "Completed" in text  # the submitted sample's output
    assert (tmp_path / "model.txt").read_text() == "the model's weights"
