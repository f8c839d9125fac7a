"""The core (read, measure, evaluate, report, demo) works without PyTorch installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
for name in ("torch", "monai", "onnxruntime", "safetensors"):
    sys.modules[name] = None  # an import of any of them now raises ImportError
from mskmri.cli import main
out = sys.argv[1]
assert main(["-q", "demo", "--out", out]) == 0
assert main(["-q", "measure", "knee", out + "/labels.nii.gz", "--json", out + "/m.json"]) == 0
assert main(["-q", "evaluate", out + "/labels.nii.gz", out + "/labels.nii.gz",
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
