"""The demo's report.html in a real headless Chromium: tables present, figures decoded, not blank.

Needs Debian's ``chromium`` (``apt-get install chromium``; ``.ci/run`` installs it under CI).
Skipped with a reason when it is absent, but a failure under ``CI=true``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

#: Seconds one Chromium run may take before the test fails.
CHROMIUM_TIMEOUT_S = 120

#: Flags for a quiet, offline, sandbox-free headless run (CI runs as root).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)

#: Inserted before </body> of a copy of the report: once everything has loaded, it writes
#: what the browser decoded into the DOM, which --dump-dom then prints.
PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.map.call(document.images, function (i) {
    return {complete: i.complete, width: i.naturalWidth, height: i.naturalHeight};
  });
  var rows = Array.prototype.map.call(
    document.querySelectorAll('table.measurements tr.m'), function (tr) {
      return {key: tr.getAttribute('data-key'),
              cells: Array.prototype.map.call(tr.cells, function (td) {
                return td.textContent.trim(); })};
    });
  var pre = document.createElement('pre');
  pre.id = 'mskmri-probe';
  pre.textContent = JSON.stringify({images: imgs, rows: rows, title: document.title});
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "/usr/bin/chromium"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("CI=true but chromium is not installed (.ci/run installs it with apt-get)")
    pytest.skip("needs a headless Chromium (`apt-get install chromium`); not installed here")


@pytest.fixture(scope="module")
def chromium() -> str:
    return _chromium()


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory, chromium: str) -> Path:
    from mskmri.demo import run_demo

    out = tmp_path_factory.mktemp("browser") / "demo"
    run_demo(out, seed=0)
    return out


def _run(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S,
                          check=False)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc


def test_report_tables_and_images_in_chromium(chromium: str, demo_dir: Path,
                                              tmp_path: Path) -> None:
    html = (demo_dir / "report.html").read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    proc = _run(chromium, tmp_path / "profile", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="mskmri-probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, "the probe script did not run: " + proc.stdout[-500:]
    state = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))

    doc = json.loads((demo_dir / "measurements.json").read_text(encoding="utf-8"))
    assert state["title"] == "mskmri demo: phantom knee"
    # one table row per measurement, each with a value and a unit
    assert len(state["rows"]) == len(doc["measurements"]) > 0
    for row in state["rows"]:
        structure, value, unit = row["cells"]
        assert structure and value and unit, row
    femur = next(r for r in state["rows"] if r["key"] == "volume.femur")
    femur_ml = next(m["value"] for m in doc["measurements"]
                    if m["name"] == "volume" and m.get("structure") == "femur")
    assert float(femur["cells"][1].replace(",", "")) == pytest.approx(femur_ml, rel=0.01)
    # every figure was decoded by the browser at its full size
    assert len(state["images"]) >= 1
    for img in state["images"]:
        assert img["complete"] and img["width"] > 300 and img["height"] > 100, img


def test_report_screenshot_is_not_blank(chromium: str, demo_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "report.png"
    _run(chromium, tmp_path / "profile", "--window-size=1280,1600", f"--screenshot={shot}",
         (demo_dir / "report.html").as_uri())
    pixels = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")).astype(float)
    assert pixels.shape[:2] == (1600, 1280)
    assert pixels.std() > 20  # a page, not an empty white (or black) sheet
    grey = pixels.mean(axis=2)
    # the dark header band on top, the white page below it, the dark figure further down
    assert grey[:40].mean() < 80 and grey[100:130].mean() > 200
    assert (grey < 60).mean() > 0.05
