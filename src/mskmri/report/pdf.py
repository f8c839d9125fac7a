"""``report.pdf`` from ``report.html`` by headless Chromium's print-to-PDF.

The PDF is the same document as the HTML, laid out by the report's print style sheet (A4,
tables kept whole where they fit, figures not split). No Python PDF library is needed: a
headless Chromium (Debian's ``chromium``) prints it. When none is installed,
:func:`require_chromium` raises :class:`PdfError` with the install command, so that
``analyze --pdf`` fails before any work is done.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Final

from mskmri.errors import MskMriError

log = logging.getLogger(__name__)

#: Executables tried in order (Debian: ``chromium``; Ubuntu snaps / others: the rest).
CHROMIUM_NAMES: Final[tuple[str, ...]] = (
    "chromium", "chromium-browser", "google-chrome", "google-chrome-stable",
)
#: Environment variable naming a Chromium executable to use instead of the search.
CHROMIUM_ENV: Final = "MSKMRI_CHROMIUM"
#: Seconds one print may take.
PRINT_TIMEOUT_S: Final = 120
#: Flags of a quiet, offline headless run.
HEADLESS_FLAGS: Final[tuple[str, ...]] = (
    "--headless",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-pdf-header-footer",
)


class PdfError(MskMriError):
    """No PDF could be made (no Chromium, or it failed)."""


def find_chromium() -> str | None:
    """Path of a headless-capable Chromium, or None (``$MSKMRI_CHROMIUM`` first)."""
    env = os.environ.get(CHROMIUM_ENV)
    if env:
        return shutil.which(env) or (env if Path(env).is_file() else None)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> str:
    """:func:`find_chromium` or a :class:`PdfError` saying how to get one."""
    found = find_chromium()
    if found is None:
        raise PdfError("--pdf needs a headless Chromium and none was found (tried "
                       f"{', '.join(CHROMIUM_NAMES)} and ${CHROMIUM_ENV}); install it "
                       "(Debian: apt-get install chromium) or leave out --pdf")
    return found


def sandbox_flags() -> list[str]:
    """``--no-sandbox`` when running as root (Chromium refuses to start as root otherwise)."""
    return ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []


def html_to_pdf(html_path: str | os.PathLike[str], pdf_path: str | os.PathLike[str], *,
                chromium: str | None = None, timeout_s: float = PRINT_TIMEOUT_S) -> Path:
    """Print a (self-contained) HTML file to PDF with headless Chromium, atomically.

    Parameters
    ----------
    html_path : path-like
        The report.
    pdf_path : path-like
        Output file; written only when Chromium produced a PDF.
    chromium : str, optional
        Executable (default: :func:`require_chromium`).
    timeout_s : float
        Seconds before the print is abandoned.

    Returns
    -------
    Path
        ``pdf_path``.

    Raises
    ------
    PdfError
        No Chromium, or it failed, timed out or wrote no PDF.
    """
    from mskmri.io import atomic_path

    exe = chromium or require_chromium()
    src = Path(html_path).resolve()
    with atomic_path(pdf_path) as tmp, tempfile.TemporaryDirectory(prefix="mskmri-pdf-") as prof:
        cmd = [exe, *HEADLESS_FLAGS, *sandbox_flags(), f"--user-data-dir={prof}",
               f"--print-to-pdf={tmp}", src.as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            raise PdfError(f"Chromium did not print {src.name} within {timeout_s:g} s; "
                           "try again or leave out --pdf") from exc
        except OSError as exc:
            raise PdfError(f"could not start {exe}: {exc}; install Debian's chromium or "
                           "leave out --pdf") from exc
        ok = tmp.is_file() and tmp.read_bytes()[:5] == b"%PDF-"
        if proc.returncode != 0 or not ok:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1][:300]
            raise PdfError(f"Chromium could not print {src.name} to PDF (exit "
                           f"{proc.returncode}: {last}); leave out --pdf or open "
                           "report.html and print it from a browser")
    log.debug("printed %s to %s", src, pdf_path)
    return Path(pdf_path)


__all__ = ["CHROMIUM_NAMES", "PdfError", "find_chromium", "html_to_pdf", "require_chromium",
           "sandbox_flags"]
