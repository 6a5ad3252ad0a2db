"""The tables of figures some test modules write to test-output/ (docs/reliability.md keeps the last run's)."""

from __future__ import annotations

import json
import os
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
COLUMNS = ("sent", "stored", "missing", "duplicates", "recovery_s", "note")


class Figures:
    """Rows of figures: `record(what, **figures)` in a test, `write()` at the end of the session."""

    def __init__(self, stem: str, module: str):
        self.stem, self.module, self.rows = stem, module, []

    def record(self, what: str, **figures) -> None:
        """One row; its rerun command names the test that measured it."""
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0].split("[")[0]
        self.rows.append({"test": test, "what": what, **figures})

    def write(self) -> None:
        if not self.rows:
            return
        OUTPUT.mkdir(exist_ok=True)
        (OUTPUT / f"{self.stem}.json").write_text(json.dumps(self.rows, indent=2))
        lines = ["| what was done | sent | stored | missing | duplicates | recovery s | note | rerun |",
                 "|---|---:|---:|---:|---:|---:|---|---|"]
        for r in self.rows:
            cells = " | ".join(str(r.get(c, "")) for c in COLUMNS)
            lines.append(f"| {r['what']} | {cells} | `./dev test {self.module} -k {r['test']}` |")
        (OUTPUT / f"{self.stem}.md").write_text("\n".join(lines) + "\n")
