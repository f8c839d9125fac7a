"""The knee and spine ``report.html`` in a real headless Chromium.

For each report type: no console error (the report's Content-Security-Policy makes any
outside resource one), every figure decoded at full size, the measurement table with a value
and a unit in each row and nothing unmeasured shown as a number, a full-page screenshot that
is not blank, and a PDF printed from it.

Needs Debian's ``chromium``. The fixture installs it with ``apt-get install chromium`` when
running as root on a machine with apt-get (as ``.ci/run`` does); otherwise the tests are
skipped locally and FAIL under ``CI=true``. Set ``MSKMRI_SCREENSHOT_DIR`` to keep the
screenshots and PDFs (e.g. to look at them).
"""

from __future__ import annotations

import html as html_lib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _analysis_inputs import knee_inputs, spine_inputs

from mskmri.cli import main
from mskmri.report.pdf import find_chromium, html_to_pdf, sandbox_flags

#: One worker runs this module (its fixtures analyse two phantoms and start Chromium).
pytestmark = pytest.mark.xdist_group("browser")

#: Seconds one Chromium run may take before the test fails.
CHROMIUM_TIMEOUT_S = 120
#: Seconds the fixture gives ``apt-get install chromium``.
INSTALL_TIMEOUT_S = 600
#: Screenshot width (a laptop) and the tallest page captured, in CSS pixels.
SHOT_WIDTH_PX = 1280
SHOT_MAX_HEIGHT_PX = 16000
#: Environment variable: folder where screenshots and PDFs are copied.
SHOT_DIR_ENV = "MSKMRI_SCREENSHOT_DIR"

#: Flags for a quiet, offline headless run; console messages go to stderr.
CHROMIUM_FLAGS = (
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=1",  # headless Chromium logs console messages (as INFO:CONSOLE) only from level 1
)

#: Inserted into a copy of the report (whose CSP is relaxed to allow this one inline script):
#: records errors and failed resources as they happen, then writes what the browser decoded
#: into the DOM, which --dump-dom prints.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  var t = e.target || {};
  window.__errors.push(t.tagName ? ('resource failed: ' + t.tagName + ' ' + (t.src || t.href))
                                 : ('error: ' + e.message));
}, true);
var __ce = console.error;
console.error = function () { window.__errors.push('console.error: ' +
  Array.prototype.join.call(arguments, ' ')); __ce.apply(console, arguments); };
window.addEventListener('load', function () {
  var imgs = Array.prototype.map.call(document.images, function (i) {
    return {complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,
            shown: i.getBoundingClientRect().width, src: i.src.slice(0, 22)};
  });
  var rows = Array.prototype.map.call(
    document.querySelectorAll('table.measurements tr.m'), function (tr) {
      return {key: tr.getAttribute('data-key'), missing: tr.classList.contains('missing'),
              cells: Array.prototype.map.call(tr.cells, function (td) {
                return td.textContent.trim(); })};
    });
  var sections = Array.prototype.map.call(document.querySelectorAll('main section[id]'),
    function (s) { return s.id; });
  var out = document.createElement('pre');
  out.id = 'mskmri-probe';
  out.textContent = JSON.stringify({
    images: imgs, rows: rows, sections: sections, title: document.title,
    errors: window.__errors, height: document.documentElement.scrollHeight,
    width: document.documentElement.scrollWidth,
    notMeasured: document.querySelectorAll('table.not-measured tbody tr').length});
  document.body.appendChild(out);
});
</script>"""


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _install_chromium() -> None:
    """``apt-get install chromium`` when we are root and apt-get exists (as .ci/run does)."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        try:
            subprocess.run(cmd, env=env, capture_output=True, timeout=INSTALL_TIMEOUT_S,
                           check=True)
        except (subprocess.SubprocessError, OSError):
            return


@pytest.fixture(scope="module")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        _install_chromium()
        found = find_chromium()
    if found is None:
        if _ci():
            pytest.fail("CI=true but no chromium could be found or installed "
                        "(apt-get install chromium, as root)")
        pytest.skip("needs a headless Chromium (`apt-get install chromium`); not installed here")
    return found


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory, chromium: str) -> dict[str, Path]:
    """``analyze knee`` (with lesions) and ``analyze spine`` on the phantoms, via the CLI."""
    root = tmp_path_factory.mktemp("browser")
    knee = knee_inputs(root / "knee_in")
    spine = spine_inputs(root / "spine_in")
    out = {"knee": root / "knee", "spine": root / "spine"}
    assert main(["-q", "analyze", "knee", str(knee["image"]), "--out", str(out["knee"]),
                 "--seg", str(knee["seg"]), "--lesions", str(knee["lesions"])]) == 0
    assert main(["-q", "analyze", "spine", str(spine["image"]), "--out", str(out["spine"]),
                 "--seg", str(spine["seg"]), "--pdf"]) == 0
    return out


def test_analyze_pdf_is_written_and_recorded(reports: dict[str, Path]) -> None:
    pdf = reports["spine"] / "report.pdf"
    assert pdf.read_bytes().startswith(b"%PDF-")
    manifest = json.loads((reports["spine"] / "analysis.json").read_text(encoding="utf-8"))
    assert manifest["outputs"]["report.pdf"]["bytes"] == pdf.stat().st_size
    assert not (reports["knee"] / "report.pdf").exists()  # only when asked


def _run(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [chromium, *CHROMIUM_FLAGS, *sandbox_flags(), f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S,
                          check=False)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc


def console_errors(stderr: str) -> list[str]:
    """Every console message in Chromium's log (the report has no script: any message, a
    CSP refusal included, means something is wrong), and uncaught errors."""
    return [line.strip() for line in stderr.splitlines()
            if ":CONSOLE" in line or "Uncaught" in line]


def probe(chromium: str, report: Path, work: Path) -> tuple[dict, list[str]]:
    """Load the report twice: as it is (console log) and with the probe (decoded state)."""
    plain = _run(chromium, work / "profile-plain", "--dump-dom", report.resolve().as_uri())
    text = report.read_text(encoding="utf-8")
    relaxed = re.sub(r"(http-equiv=\"Content-Security-Policy\" content=\"[^\"]*)",
                     r"\1; script-src 'unsafe-inline'", text, count=1)
    copy = report.with_name(f"probe-{report.parent.name}.html")
    copy.write_text(relaxed.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    try:
        proc = _run(chromium, work / "profile-probe", "--virtual-time-budget=5000",
                    "--dump-dom", copy.resolve().as_uri())
    finally:
        copy.unlink()
    found = re.search(r'<pre id="mskmri-probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, "the probe script did not run: " + proc.stdout[-500:]
    return json.loads(html_lib.unescape(found.group(1))), console_errors(plain.stderr)


@pytest.fixture(scope="module")
def probed(chromium: str, reports: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, list[str]]]:
    """:func:`probe` of each report, once."""
    work = tmp_path_factory.mktemp("probe")
    return {kind: probe(chromium, path / "report.html", work / kind)
            for kind, path in reports.items()}


def _keep(path: Path, name: str) -> None:
    folder = os.environ.get(SHOT_DIR_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(folder) / name)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", ["knee", "spine"])
def test_report_loads_cleanly_with_tables_and_images(reports: dict[str, Path], probed: dict,
                                                     kind: str) -> None:
    state, errors = probed[kind]
    assert errors == [], errors
    assert state["errors"] == [], state["errors"]
    # every figure decoded at its full size, inline, and shown on the page
    assert len(state["images"]) >= 2
    for img in state["images"]:
        assert img["src"].startswith("data:image/png"), img
        assert img["complete"] and img["width"] > 200 and img["height"] > 100, img
        assert img["shown"] > 100, img
    # nothing wider than a laptop window: no horizontal scrolling
    assert state["width"] <= SHOT_WIDTH_PX + 1, state["width"]
    # one row per measurement, each with a value and a unit; unmeasured never a number
    doc = json.loads((reports[kind] / "measurements.json").read_text(encoding="utf-8"))
    assert len(state["rows"]) == len(doc["measurements"]) > 0
    for row in state["rows"]:
        structure, value, unit, note = row["cells"]
        assert structure and value and unit, row
        if row["missing"]:
            assert value == "not measured" and note, row
        else:
            float(value.replace(",", ""))  # a number
    for section in ("study", "qc", "figures", "measurements", "surfaces", "methods",
                    "provenance"):
        assert section in state["sections"], (section, state["sections"])
    if kind == "knee":
        assert "lesions" in state["sections"]
        femur = next(r for r in state["rows"] if r["key"] == "volume.femur")
        ml = next(m["value"] for m in doc["measurements"]
                  if m["name"] == "volume" and m.get("structure") == "femur")
        assert float(femur["cells"][1].replace(",", "")) == pytest.approx(ml, rel=0.01)
    else:
        # the phantom has no cord: listed as not measured, with its reason (its bodies are
        # graded, its disc heights measured between the bodies)
        assert state["notMeasured"] >= 1
        l3 = next(r for r in state["rows"] if r["key"] == "middle_height.L3")
        assert float(l3["cells"][1]) == pytest.approx(27.0, abs=1.0)


def test_console_check_catches_an_outside_resource(chromium: str, reports: dict[str, Path],
                                                   tmp_path: Path) -> None:
    """The console check can fail: an <img> from the network is refused and reported."""
    text = (reports["knee"] / "report.html").read_text(encoding="utf-8")
    bad = tmp_path / "bad" / "report.html"
    bad.parent.mkdir()
    bad.write_text(text.replace("<main>", '<main><img src="http://127.0.0.1:9/x.png">', 1),
                   encoding="utf-8")
    plain = _run(chromium, tmp_path / "profile", "--dump-dom", bad.resolve().as_uri())
    errors = console_errors(plain.stderr)
    assert errors and any("127.0.0.1" in e for e in errors), errors


@pytest.mark.parametrize("kind", ["knee", "spine"])
def test_screenshot_and_pdf(chromium: str, reports: dict[str, Path], probed: dict, kind: str,
                            tmp_path: Path) -> None:
    from PIL import Image

    report = reports[kind] / "report.html"
    state, _ = probed[kind]
    height = min(int(state["height"]), SHOT_MAX_HEIGHT_PX)
    shot = tmp_path / f"{kind}.png"
    _run(chromium, tmp_path / "profile-shot", f"--window-size={SHOT_WIDTH_PX},{height}",
         f"--screenshot={shot}", report.resolve().as_uri())
    _keep(shot, f"{kind}_report.png")
    pixels = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")).astype(float)
    assert pixels.shape[:2] == (height, SHOT_WIDTH_PX)
    grey = pixels.mean(axis=2)
    assert pixels.std() > 20  # a page, not an empty white (or black) sheet
    # the dark header band on top, the white page below it, dark figures further down
    assert grey[:40].mean() < 80 and grey[120:140].mean() > 200
    assert (grey < 60).mean() > 0.05

    pdf = html_to_pdf(report, tmp_path / f"{kind}.pdf", chromium=chromium)
    _keep(pdf, f"{kind}_report.pdf")
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-")
    pages = len(re.findall(rb"/Type\s*/Page\b", data))
    assert pages >= 2, pages  # A4: the figures and tables do not fit on one page
