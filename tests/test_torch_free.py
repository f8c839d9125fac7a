"""The core (read, measure, evaluate, report, demo) works without PyTorch installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import importlib.abc
import sys

BLOCKED = {"torch", "monai", "onnxruntime", "safetensors"}


# An import of any BLOCKED package raises, as if it were not installed (not
# sys.modules[name] = None: SciPy looks torch up in sys.modules and fails on None).
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Block())
from mskmri.cli import main
out = sys.argv[1]
assert main(["-q", "demo", "--out", out, "--cohort-size", "4", "--workers", "1"]) == 0
truth = out + "/inputs/knee/truth.nii.gz"  # the demo's phantom knee truth
assert main(["-q", "measure", "knee", truth, "--json", out + "/m.json"]) == 0
assert main(["-q", "evaluate", truth, truth,
             "--schema", "knee", "--json", out + "/e.json"]) == 0
assert "torch" not in {m for m, v in sys.modules.items() if v is not None}
"""


def test_demo_measure_and_evaluate_run_without_torch(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "m.json").read_text())
    assert doc["schema"] == "mskmri/measurements/1" and doc["measurements"]
