"""The ``mskmri`` command line: parse, build a config, call one library function, write.

Each subcommand has an ``_add_<name>`` function that declares its arguments and a ``_run_<name>``
function that does the work; heavy imports happen inside ``_run_*`` only. ``main(argv)`` is
testable in-process and returns the exit status:

- 0 on success;
- 2 for bad input or options: one line on stderr saying what was wrong and what to do, no
  traceback, nothing half-written (outputs are written atomically);
- 1 for anything unexpected (a bug): the traceback is kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mskmri import __version__
from mskmri.errors import MskMriError

log = logging.getLogger("mskmri")

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2

Runner = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line (exit 2), like our own errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"mskmri: error: {message} (see `{self.prog} --help`)\n")


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"
                                           if verbose > 1 else "%(message)s"))
    root = logging.getLogger("mskmri")
    root.handlers = [h for h in root.handlers if isinstance(h, logging.NullHandler)]
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _geometry_options(p: argparse.ArgumentParser) -> None:
    """Options for choosing one image out of a DICOM folder."""
    p.add_argument("--series", help="DICOM folder with several series: which one "
                   "(SeriesInstanceUID, SeriesNumber or index from `mskmri info`)")
    p.add_argument("--echo", type=float, help="multi-echo series: echo time in ms "
                   "(or echo number)")
    p.add_argument("--allow-resample", action="store_true",
                   help="resample a DICOM series with non-uniform slice spacing instead of refusing it")


def _read_image(args: argparse.Namespace, path: str | Path) -> Any:
    from mskmri.io import read

    return read(path, series=getattr(args, "series", None), echo=getattr(args, "echo", None),
                allow_resample=getattr(args, "allow_resample", False))


# ============================================================================ info
def _add_info(sub: Any) -> None:
    p = sub.add_parser("info", help="describe an image, label map or DICOM folder")
    p.add_argument("path", help="image file or DICOM folder")
    p.add_argument("--json", action="store_true", help="print JSON (schema mskmri/info/1)")
    _geometry_options(p)
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    """Describe PATH; a DICOM folder lists its series, echoes and stacks."""
    from mskmri.io.describe import describe, format_description

    info = describe(args.path, series=args.series, echo=args.echo,
                    allow_resample=args.allow_resample)
    if args.json:
        _print_json(info)
    else:
        sys.stdout.write(format_description(info) + "\n")
    return EXIT_OK


# ============================================================================ convert
def _add_convert(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert an image (DICOM folder, NIfTI, NRRD, MHA) "
                       "to NIfTI, NRRD or MHA, geometry exact")
    p.add_argument("src", help="input image file or DICOM folder")
    p.add_argument("dst", help="output file (.nii.gz, .nii, .nrrd, .mha)")
    _geometry_options(p)
    p.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    """Read SRC (one series/echo of a DICOM folder, or an image file) and write it to DST.

    The output extension is checked before reading; a label-map sidecar beside SRC is
    carried to DST's sidecar; DST is written atomically (nothing half-written on failure).
    """
    from mskmri.errors import UnsupportedFormatError
    from mskmri.io import atomic_write_json, sidecar_path, write
    from mskmri.io.describe import LABELMAP_SIDECAR_SCHEMA

    dst = Path(args.dst)
    if not dst.name.lower().endswith((".nii.gz", ".nii", ".nrrd", ".mha")):
        raise UnsupportedFormatError(
            f"cannot write {dst.name}: give an output ending in .nii.gz, .nii, .nrrd or .mha"
        )
    vol = _read_image(args, args.src)
    write(vol, dst)
    src = Path(args.src)
    side = sidecar_path(src) if src.is_file() else None
    if side is not None and side.is_file():
        try:
            data = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and data.get("schema") == LABELMAP_SIDECAR_SCHEMA:
            atomic_write_json(sidecar_path(dst), data)
    log.info("wrote %s %s", dst, vol)
    return EXIT_OK


# ============================================================================ registry
#: (adder) for every subcommand, in help order. Add new commands here.
_COMMANDS: list[Callable[[Any], None]] = [
    _add_info,
    _add_convert,
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (used by ``main`` and by the docs)."""
    parser = _Parser(prog="mskmri", description="Musculoskeletal MRI toolkit: knee and spine "
                     "segmentation, lesion detection, measurements and reports.")
    parser.add_argument("--version", action="version", version=f"mskmri {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="only warnings and errors; no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 1 bug)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    _configure_logging(args.verbose, args.quiet)
    from mskmri import _progress

    if args.quiet:
        _progress.set_enabled(False)
    try:
        return int(args.run(args))
    except MskMriError as exc:
        sys.stderr.write(f"mskmri: error: {exc}\n")
        return EXIT_USAGE
    except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        sys.stderr.write(f"mskmri: error: cannot write or read {exc.filename}: {exc.strerror}; "
                         "check the path and its permissions\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("mskmri: interrupted\n")
        return 130


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
