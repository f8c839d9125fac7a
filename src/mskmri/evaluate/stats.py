"""Group statistics over measurement tables: two groups, every measurement, corrected.

The input is a table: one row per subject, a group column, and one column per measurement
(with its unit). It comes from a CSV file, from ``mskmri/measurements/1`` JSON files (one per
subject; the column is :attr:`mskmri.measure.base.Measurement.key`, e.g.
``volume.joint_effusion``), or directly from Python rows (:func:`table_from_rows`), which is how
a cohort run feeds it.

For each measurement, between a *reference* group ``A`` and the *other* group ``B``:

- per group: n, mean, SD (n - 1), median, quartiles, min, max (in the measurement's unit);
- Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``) and the Mann-Whitney U test
  (``scipy.stats.mannwhitneyu``, two-sided), each with Holm's step-down correction across
  the measurements of the table (family-wise error at ``alpha``);
- Hedges' g = J (mean_B - mean_A) / s_pooled with J = 1 - 3 / (4 (n_A + n_B) - 9), and its CI
  from the normal approximation SE = sqrt((n_A + n_B) / (n_A n_B) + g^2 / (2 (n_A + n_B)))
  (Hedges & Olkin 1985), unit "SD" (pooled standard deviations);
- Cliff's delta = P(B > A) - P(B < A) over all pairs (equal to the rank-biserial
  correlation of the U test), unit "1", with a percentile bootstrap CI
  (``scipy.stats.bootstrap``, groups resampled independently, ``n_bootstrap`` resamples, the
  random stream of each measurement seeded by ``(seed, crc32(column name))`` so adding a column
  changes no other column's CI).

Missing values (empty cells, ``NA``, ``null`` in JSON) are left out per measurement; the n used
is reported. A test with fewer than :data:`MIN_GROUP_SIZE` values in a group, or with no
variance, is NaN with a reason.

CSV columns carry their unit in brackets: ``effusion_volume [mL]``; a column without one is
read with unit ``"unspecified"`` and a warning.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mskmri.errors import InputNotFoundError, MskMriError, UnsupportedFormatError

log = logging.getLogger(__name__)

#: Version tag of the statistics JSON document.
STATS_SCHEMA = "mskmri/stats/1"

#: Family-wise significance level after Holm's correction.
ALPHA = 0.05

#: Confidence level of the effect-size intervals.
CI_LEVEL = 0.95

#: Bootstrap resamples for Cliff's delta CI.
N_BOOTSTRAP = 2000

#: Default seed of the bootstrap.
DEFAULT_SEED = 0

#: Fewest values per group for a test or an effect size.
MIN_GROUP_SIZE = 2

#: Unit of a CSV column that names none.
UNSPECIFIED_UNIT = "unspecified"

#: Cells read as missing values (case-insensitive).
MISSING_CELLS = frozenset({"", "na", "nan", "n/a", "null", "none", "-"})

#: Largest (resamples x n_A x n_B) block evaluated at once by the bootstrap.
_BOOTSTRAP_BLOCK = 20_000_000

_UNIT_HEADER = re.compile(r"^(?P<name>.*?\S)\s*\[(?P<unit>[^\]]+)\]\s*$")
_FILENAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class TableError(MskMriError):
    """The table cannot be compared: no such group column, not two groups, no measurements."""


# ============================================================================ the table
@dataclass(frozen=True)
class MeasurementTable:
    """One row per subject: a group label and numeric measurements (NaN = missing).

    Attributes
    ----------
    subjects : tuple of str
        Subject ids, in row order.
    groups : tuple of str
        Group label of each subject.
    values : mapping of str to (n_subjects,) float ndarray
        Column name -> values in ``units[column]``.
    units : mapping of str to str
        Column name -> unit.
    group_column : str
        Name of the grouping variable.
    source : str
        Where the table came from (for the output document).
    warnings : tuple of str
        What was skipped or guessed while reading.
    """

    subjects: tuple[str, ...]
    groups: tuple[str, ...]
    values: Mapping[str, np.ndarray]
    units: Mapping[str, str]
    group_column: str
    source: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def columns(self) -> list[str]:
        """Measurement column names, in table order."""
        return list(self.values)

    def group_names(self) -> list[str]:
        """Distinct group labels, sorted."""
        return sorted(set(self.groups))

    def group_values(self, column: str, group: str) -> np.ndarray:
        """Non-missing values of ``column`` in ``group``."""
        v = self.values[column][np.asarray(self.groups) == group]
        return v[np.isfinite(v)]


def _parse_cell(cell: Any) -> float | None:
    """float, NaN for a missing cell, None for a non-numeric one."""
    if cell is None:
        return math.nan
    if isinstance(cell, bool):
        return None
    if isinstance(cell, (int, float, np.number)):
        return float(cell)
    s = str(cell).strip()
    if s.lower() in MISSING_CELLS:
        return math.nan
    try:
        return float(s)
    except ValueError:
        return None


def split_unit(header: str) -> tuple[str, str | None]:
    """``"effusion [mL]"`` -> ``("effusion", "mL")``; no brackets -> ``(header, None)``."""
    m = _UNIT_HEADER.match(header)
    if m:
        return m.group("name"), m.group("unit").strip()
    return header.strip(), None


def table_from_rows(
    rows: Sequence[Mapping[str, Any]],
    *,
    group: str,
    id_column: str | None = None,
    units: Mapping[str, str] | None = None,
    source: str = "rows",
) -> MeasurementTable:
    """Build a table from dict rows (one per subject).

    Parameters
    ----------
    rows : sequence of mapping
        Column -> value. Column names may carry the unit as ``"name [unit]"``.
    group : str
        Name of the group column (must be present and non-empty in every row).
    id_column : str, optional
        Column holding subject ids; default ``"subject"`` if present, else the row number.
    units : mapping of str to str, optional
        Column -> unit for columns whose name carries none.
    source : str
        Description of where the rows came from.

    Returns
    -------
    MeasurementTable
        Numeric columns only; non-numeric columns are skipped with a warning.
    """
    if not rows:
        raise TableError(f"{source} has no rows; give a table with one row per subject")
    headers: list[str] = []
    for r in rows:
        for k in r:
            if k not in headers:
                headers.append(k)
    if group not in headers:
        close = [h for h in headers if h.lower() == group.lower()]
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TableError(
            f"{source} has no column {group!r} to group by (columns: {', '.join(headers)}){hint}"
        )
    if id_column is None and "subject" in headers:
        id_column = "subject"
    if id_column is not None and id_column not in headers:
        raise TableError(f"{source} has no id column {id_column!r}")
    groups = []
    for i, r in enumerate(rows):
        g = r.get(group)
        if g is None or str(g).strip() == "" or str(g).strip().lower() in MISSING_CELLS:
            raise TableError(
                f"row {i + 1} of {source} has no value in the group column {group!r}; every "
                "subject needs a group"
            )
        groups.append(str(g).strip())
    subjects = tuple(
        str(r.get(id_column)) if id_column is not None else str(i + 1)
        for i, r in enumerate(rows)
    )
    values: dict[str, np.ndarray] = {}
    unit_of: dict[str, str] = {}
    warnings: list[str] = []
    units = dict(units or {})
    for h in headers:
        if h in (group, id_column):
            continue
        cells = [_parse_cell(r.get(h)) for r in rows]
        if any(c is None for c in cells):
            warnings.append(f"column {h!r} is not numeric: skipped")
            continue
        name, unit = split_unit(h)
        if unit is None:
            unit = units.get(h) or units.get(name)
        if unit is None:
            unit = UNSPECIFIED_UNIT
            warnings.append(f"column {h!r} names no unit (write it as '{name} [unit]')")
        if name in values:
            raise TableError(f"{source} has the measurement {name!r} twice")
        values[name] = np.asarray(cells, dtype=np.float64)
        unit_of[name] = unit
    if not values:
        raise TableError(f"{source} has no numeric measurement columns besides {group!r}")
    return MeasurementTable(
        subjects=subjects, groups=tuple(groups), values=values, units=unit_of,
        group_column=group, source=source, warnings=tuple(warnings),
    )


def read_table_csv(
    path: str | os.PathLike[str], *, group: str, id_column: str | None = None
) -> MeasurementTable:
    """Read a CSV table (header row; one row per subject; units as ``name [unit]``)."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"{p} does not exist or is not a file; check the path")
    try:
        with p.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UnsupportedFormatError(f"{p} is not a readable CSV table ({exc})") from exc
    return table_from_rows(rows, group=group, id_column=id_column, source=str(p))


def write_table_csv(table: MeasurementTable, path: str | os.PathLike[str]) -> Path:
    """Write a table as CSV (``subject``, group, ``name [unit]`` columns), atomically."""
    from mskmri.io import atomic_path

    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", table.group_column]
                   + [f"{c} [{table.units[c]}]" for c in table.columns])
        for i, (s, g) in enumerate(zip(table.subjects, table.groups, strict=True)):
            w.writerow([s, g] + [
                "" if not np.isfinite(table.values[c][i]) else repr(float(table.values[c][i]))
                for c in table.columns
            ])
    return Path(path)


# ============================================================================ JSON input
def collect_measurement_files(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and folders into measurements JSON files.

    A folder is searched recursively for ``*.json`` files whose ``schema`` is
    ``mskmri/measurements/1`` (label sidecars and other JSON are skipped); a file named
    explicitly must be a measurements document.
    """
    from mskmri.measure.base import MEASUREMENTS_SCHEMA, read_measurements

    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in sorted(p.rglob("*.json")):
                try:
                    read_measurements(f)
                except MskMriError:
                    log.debug("skipping %s: not a %s document", f, MEASUREMENTS_SCHEMA)
                    continue
                out.append(f)
        elif p.is_file():
            out.append(p)
        else:
            raise InputNotFoundError(f"{p} does not exist; check the path")
    if not out:
        raise TableError(
            f"no {MEASUREMENTS_SCHEMA} JSON files in {', '.join(map(str, inputs))}; give the "
            "files written by `mskmri measure --json` (or a CSV table)"
        )
    return out


def read_manifest(path: str | os.PathLike[str], *, group: str) -> dict[str, str]:
    """Read a manifest CSV: a ``file`` column (path or file stem) and the ``group`` column.

    Returns
    -------
    dict
        Key (as written in the ``file`` column) -> group label.
    """
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"manifest {p} does not exist; check the path")
    with p.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "file" not in rows[0] or group not in rows[0]:
        cols = ", ".join(rows[0]) if rows else "none"
        raise TableError(
            f"manifest {p} needs the columns 'file' and {group!r} (it has: {cols})"
        )
    return {str(r["file"]).strip(): str(r[group]).strip() for r in rows}


def _manifest_lookup(manifest: Mapping[str, str], base: Path) -> Callable[[Path], str]:
    resolved = {}
    for key, g in manifest.items():
        kp = Path(key)
        resolved[str((kp if kp.is_absolute() else base / kp).resolve())] = g
        resolved.setdefault(kp.name, g)
        resolved.setdefault(kp.name.split(".")[0], g)

    def lookup(f: Path) -> str:
        for k in (str(f.resolve()), f.name, f.name.split(".")[0], f.parent.name):
            if k in resolved:
                return resolved[k]
        raise TableError(f"{f} is not in the manifest; add a row for it (file,group)")

    return lookup


def table_from_measurements(
    files: Sequence[str | os.PathLike[str]],
    *,
    group_of: Callable[[Path], str],
    group_column: str = "group",
) -> MeasurementTable:
    """Build a table from measurements JSON documents, one per subject.

    Parameters
    ----------
    files : sequence of path-like
        ``mskmri/measurements/1`` documents.
    group_of : callable
        File path -> group label (from a manifest, or the parent folder's name).
    group_column : str
        Name given to the grouping variable.

    Returns
    -------
    MeasurementTable
        Columns are :attr:`Measurement.key` (``volume.joint_effusion``); a measurement absent
        from a document is missing for that subject. Subject ids are the file paths relative
        to their common folder.
    """
    from mskmri.measure.base import read_measurements

    paths = [Path(f) for f in files]
    common = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
    rows: list[dict[str, Any]] = []
    units: dict[str, str] = {}
    for f in paths:
        doc = read_measurements(f)
        sid = str(f.resolve().relative_to(common))
        row: dict[str, Any] = {"subject": sid, group_column: group_of(f)}
        for m in doc.get("measurements", []):
            key = ".".join(p for p in (m.get("name"), m.get("structure"), m.get("region")) if p)
            unit = m.get("unit")
            if key in units and units[key] != unit:
                raise TableError(
                    f"{f}: {key} is in {unit!r} but in {units[key]!r} elsewhere; measurements "
                    "of one column must share a unit"
                )
            units[key] = unit
            row[key] = m.get("value")
        rows.append(row)
    return table_from_rows(rows, group=group_column, id_column="subject", units=units,
                           source=f"{len(paths)} measurements files under {common}")


# ============================================================================ statistics
@dataclass(frozen=True)
class GroupSummary:
    """Descriptive statistics of one group (in the measurement's unit)."""

    n: int
    mean: float
    sd: float
    median: float
    q1: float
    q3: float
    min: float
    max: float

    @classmethod
    def of(cls, x: np.ndarray) -> GroupSummary:
        """Summary of the finite values ``x`` (NaN fields when there are too few)."""
        n = int(x.size)
        if n == 0:
            nan = math.nan
            return cls(0, nan, nan, nan, nan, nan, nan, nan)
        q1, med, q3 = np.percentile(x, [25, 50, 75])
        return cls(
            n=n, mean=float(x.mean()), sd=float(x.std(ddof=1)) if n > 1 else math.nan,
            median=float(med), q1=float(q1), q3=float(q3), min=float(x.min()), max=float(x.max()),
        )


@dataclass(frozen=True)
class TestResult:
    """A two-sided test: statistic, raw p, Holm-adjusted p, and the reason when undefined."""

    name: str
    statistic: float
    p: float
    p_holm: float = math.nan
    df: float | None = None
    reason: str | None = None

    @property
    def defined(self) -> bool:
        """False when the test could not be run (see :attr:`reason`)."""
        return not math.isnan(self.p)


@dataclass(frozen=True)
class EffectSize:
    """An effect size with its confidence interval."""

    name: str
    value: float
    ci_low: float
    ci_high: float
    ci_level: float
    unit: str
    method: str
    reason: str | None = None


@dataclass(frozen=True)
class MeasurementComparison:
    """Comparison of one measurement between the reference and the other group."""

    name: str
    unit: str
    summaries: Mapping[str, GroupSummary]
    mean_difference: float
    welch: TestResult
    mann_whitney: TestResult
    hedges_g: EffectSize
    cliffs_delta: EffectSize

    def significant(self, alpha: float = ALPHA) -> bool:
        """Welch's test significant after Holm's correction."""
        return self.welch.defined and self.welch.p_holm < alpha


@dataclass(frozen=True)
class GroupComparison:
    """All measurements compared between ``reference`` and ``other``."""

    reference: str
    other: str
    group_column: str
    comparisons: tuple[MeasurementComparison, ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> MeasurementComparison:
        for c in self.comparisons:
            if c.name == name:
                return c
        raise KeyError(name)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and do not count in m).

    Written out because SciPy has no Holm correction (only ``false_discovery_control``) and
    statsmodels is not a dependency: with the m finite p sorted ascending,
    ``p_adj(i) = max_{j <= i} min(1, (m - j + 1) p(j))`` (1-based ranks).
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


def hedges_g(a: np.ndarray, b: np.ndarray, *, ci_level: float = CI_LEVEL) -> EffectSize:
    """Hedges' g of ``b`` relative to ``a`` with a normal-approximation CI (module docstring)."""
    from scipy import stats

    n1, n2 = a.size, b.size
    method = "Hedges' g, CI from the Hedges & Olkin normal approximation"
    if n1 < MIN_GROUP_SIZE or n2 < MIN_GROUP_SIZE:
        return EffectSize("hedges_g", math.nan, math.nan, math.nan, ci_level, "SD", method,
                          reason=f"fewer than {MIN_GROUP_SIZE} values in a group")
    sp2 = ((n1 - 1) * a.var(ddof=1) + (n2 - 1) * b.var(ddof=1)) / (n1 + n2 - 2)
    if not sp2 > 0:
        return EffectSize("hedges_g", math.nan, math.nan, math.nan, ci_level, "SD", method,
                          reason="no variance within the groups")
    d = (b.mean() - a.mean()) / math.sqrt(sp2)
    g = (1.0 - 3.0 / (4.0 * (n1 + n2) - 9.0)) * d
    se = math.sqrt((n1 + n2) / (n1 * n2) + g * g / (2.0 * (n1 + n2)))
    z = float(stats.norm.ppf(0.5 + ci_level / 2.0))
    return EffectSize("hedges_g", float(g), float(g - z * se), float(g + z * se), ci_level,
                      "SD", method)


def cliffs_delta(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray | float:
    """Cliff's delta ``P(B > A) - P(B < A)`` over all pairs; vectorised over leading axes.

    Parameters
    ----------
    a : (..., n_A) ndarray
    b : (..., n_B) ndarray
    axis : int
        The sample axis (must be the last; kept for ``scipy.stats.bootstrap``).
    """
    a = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
    b = np.moveaxis(np.asarray(b, dtype=np.float64), axis, -1)
    s = np.sign(b[..., None, :] - a[..., :, None])
    out = s.mean(axis=(-2, -1))
    return float(out) if np.ndim(out) == 0 else out


def cliffs_delta_ci(
    a: np.ndarray, b: np.ndarray, *, ci_level: float = CI_LEVEL, n_bootstrap: int = N_BOOTSTRAP,
    rng: np.random.Generator,
) -> EffectSize:
    """Cliff's delta with a percentile bootstrap CI (groups resampled independently)."""
    from scipy import stats

    method = f"Cliff's delta, percentile bootstrap CI ({n_bootstrap} resamples)"
    if a.size < MIN_GROUP_SIZE or b.size < MIN_GROUP_SIZE:
        return EffectSize("cliffs_delta", math.nan, math.nan, math.nan, ci_level, "1", method,
                          reason=f"fewer than {MIN_GROUP_SIZE} values in a group")
    value = float(cliffs_delta(a, b))
    if n_bootstrap <= 0:
        return EffectSize("cliffs_delta", value, math.nan, math.nan, ci_level, "1",
                          "Cliff's delta (no bootstrap requested)",
                          reason="no CI: bootstrap switched off (n_bootstrap = 0)")
    batch = max(1, _BOOTSTRAP_BLOCK // (a.size * b.size))
    res = stats.bootstrap(
        (a, b), cliffs_delta, paired=False, vectorized=True, n_resamples=n_bootstrap,
        batch=batch, confidence_level=ci_level, method="percentile", rng=rng,
    )
    ci = res.confidence_interval
    return EffectSize("cliffs_delta", value, float(ci.low), float(ci.high), ci_level, "1", method)


def _welch(a: np.ndarray, b: np.ndarray) -> TestResult:
    from scipy import stats

    if a.size < MIN_GROUP_SIZE or b.size < MIN_GROUP_SIZE:
        return TestResult("welch_t", math.nan, math.nan,
                          reason=f"fewer than {MIN_GROUP_SIZE} values in a group")
    if a.var(ddof=1) == 0 and b.var(ddof=1) == 0:
        return TestResult("welch_t", math.nan, math.nan, reason="no variance in either group")
    r = stats.ttest_ind(b, a, equal_var=False)
    return TestResult("welch_t", float(r.statistic), float(r.pvalue), df=float(r.df))


def _mann_whitney(a: np.ndarray, b: np.ndarray) -> TestResult:
    from scipy import stats

    if a.size < MIN_GROUP_SIZE or b.size < MIN_GROUP_SIZE:
        return TestResult("mann_whitney_u", math.nan, math.nan,
                          reason=f"fewer than {MIN_GROUP_SIZE} values in a group")
    if np.unique(np.concatenate([a, b])).size == 1:
        return TestResult("mann_whitney_u", math.nan, math.nan,
                          reason="all values are equal")
    r = stats.mannwhitneyu(b, a, alternative="two-sided")
    return TestResult("mann_whitney_u", float(r.statistic), float(r.pvalue))


def _choose_groups(table: MeasurementTable, groups: Sequence[str] | None) -> tuple[str, str]:
    present = table.group_names()
    if groups is None:
        if len(present) != 2:
            raise TableError(
                f"the column {table.group_column!r} has {len(present)} groups "
                f"({', '.join(present)}); comparisons need exactly two: choose them with "
                "groups=(reference, other) / --groups REF,OTHER"
            )
        return present[0], present[1]
    if len(groups) != 2 or groups[0] == groups[1]:
        raise TableError(f"give two different groups (reference, other), not {list(groups)}")
    missing = [g for g in groups if g not in present]
    if missing:
        raise TableError(
            f"group(s) {missing} not found in column {table.group_column!r} "
            f"(groups present: {', '.join(present)})"
        )
    return str(groups[0]), str(groups[1])


def compare_groups(
    table: MeasurementTable,
    *,
    groups: Sequence[str] | None = None,
    alpha: float = ALPHA,
    ci_level: float = CI_LEVEL,
    n_bootstrap: int = N_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
) -> GroupComparison:
    """Compare every measurement of ``table`` between two groups.

    Parameters
    ----------
    table : MeasurementTable
        One row per subject.
    groups : (str, str), optional
        ``(reference, other)``; effects are ``other - reference``. Default: the two groups
        present, in sorted order (an error when there are not exactly two).
    alpha : float
        Family-wise level for the ``significant`` flags (Holm).
    ci_level : float
        Confidence level of the effect-size intervals.
    n_bootstrap : int
        Bootstrap resamples for Cliff's delta (0 = no CI).
    seed : int
        Seed of the bootstrap streams.

    Returns
    -------
    GroupComparison
    """
    if not 0 < alpha < 1 or not 0 < ci_level < 1:
        raise TableError(f"alpha and ci_level must be in (0, 1), not {alpha}, {ci_level}")
    ref, oth = _choose_groups(table, groups)
    rows = []
    warnings = list(table.warnings)
    for col in table.columns:
        a = table.group_values(col, ref)
        b = table.group_values(col, oth)
        rng = np.random.default_rng([int(seed), zlib.crc32(col.encode("utf-8"))])
        welch = _welch(a, b)
        mwu = _mann_whitney(a, b)
        for t in (welch, mwu):
            if t.reason:
                warnings.append(f"{col}: {t.name} not computed ({t.reason})")
        rows.append(MeasurementComparison(
            name=col, unit=table.units[col],
            summaries={ref: GroupSummary.of(a), oth: GroupSummary.of(b)},
            mean_difference=float(b.mean() - a.mean()) if a.size and b.size else math.nan,
            welch=welch, mann_whitney=mwu,
            hedges_g=hedges_g(a, b, ci_level=ci_level),
            cliffs_delta=cliffs_delta_ci(a, b, ci_level=ci_level, n_bootstrap=n_bootstrap,
                                         rng=rng),
        ))
    p_w = holm([r.welch.p for r in rows])
    p_u = holm([r.mann_whitney.p for r in rows])
    rows = [
        replace(r, welch=replace(r.welch, p_holm=float(pw)),
                mann_whitney=replace(r.mann_whitney, p_holm=float(pu)))
        for r, pw, pu in zip(rows, p_w, p_u, strict=True)
    ]
    options = {
        "reference_group": ref, "other_group": oth, "alpha": alpha, "ci_level": ci_level,
        "correction": "holm (across measurements, separately for each test)",
        "n_bootstrap": int(n_bootstrap), "seed": int(seed),
        "bootstrap": "percentile; groups resampled independently; stream of each measurement "
                     "= numpy default_rng([seed, crc32(measurement name)])",
        "effect_direction": f"{oth} minus {ref}",
    }
    return GroupComparison(reference=ref, other=oth, group_column=table.group_column,
                           comparisons=tuple(rows), options=options, warnings=tuple(warnings))


# ============================================================================ output
def _num(x: float | None) -> float | None:
    from mskmri.measure.base import json_number

    return json_number(x)  # type: ignore[return-value]


def _test_dict(t: TestResult, alpha: float) -> dict[str, Any]:
    out: dict[str, Any] = {"statistic": _num(t.statistic), "p": _num(t.p),
                           "p_holm": _num(t.p_holm),
                           "significant": bool(t.defined and t.p_holm < alpha)}
    if t.df is not None:
        out["df"] = _num(t.df)
    if t.reason:
        out["reason"] = t.reason
    return out


def _effect_dict(e: EffectSize) -> dict[str, Any]:
    out: dict[str, Any] = {"value": _num(e.value), "unit": e.unit,
                           "ci": [_num(e.ci_low), _num(e.ci_high)], "ci_level": e.ci_level,
                           "method": e.method}
    if e.reason:
        out["reason"] = e.reason
    return out


def stats_document(
    result: GroupComparison,
    *,
    table: MeasurementTable,
    tool_version: str,
    plots: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The ``mskmri/stats/1`` document.

    Numbers with a physical meaning carry ``unit``: group statistics and the mean difference
    are in the measurement's unit; Hedges' g is in pooled SDs (``"SD"``); Cliff's delta,
    test statistics and p-values are dimensionless.
    """
    alpha = float(result.options.get("alpha", ALPHA))
    ms = []
    for c in result.comparisons:
        entry: dict[str, Any] = {
            "name": c.name,
            "unit": c.unit,
            "groups": {
                g: {"n": s.n, "mean": _num(s.mean), "sd": _num(s.sd), "median": _num(s.median),
                    "q1": _num(s.q1), "q3": _num(s.q3), "min": _num(s.min), "max": _num(s.max),
                    "unit": c.unit}
                for g, s in c.summaries.items()
            },
            "mean_difference": {"value": _num(c.mean_difference), "unit": c.unit},
            "welch_t": _test_dict(c.welch, alpha),
            "mann_whitney_u": _test_dict(c.mann_whitney, alpha),
            "hedges_g": _effect_dict(c.hedges_g),
            "cliffs_delta": _effect_dict(c.cliffs_delta),
        }
        if plots and c.name in plots:
            entry["plot"] = plots[c.name]
        ms.append(entry)
    counts = {g: int(sum(1 for x in table.groups if x == g)) for g in table.group_names()}
    return {
        "schema": STATS_SCHEMA,
        "tool": {"name": "mskmri", "version": str(tool_version)},
        "input": {"source": table.source, "group_column": table.group_column,
                  "n_subjects": len(table.subjects), "subjects_per_group": counts},
        "options": dict(result.options),
        "measurements": ms,
        "warnings": list(result.warnings),
    }


def plot_file_name(measurement: str) -> str:
    """File name of a measurement's plot (unsafe characters replaced by ``_``)."""
    return _FILENAME_UNSAFE.sub("_", measurement).strip("_") + ".png"


#: Horizontal jitter (fraction of the box spacing) of the strip points, and plot size.
STRIP_JITTER = 0.08
PLOT_SIZE_INCHES = (4.0, 4.5)
PLOT_DPI = 110


def plot_comparisons(
    table: MeasurementTable,
    result: GroupComparison,
    out_dir: str | os.PathLike[str],
    *,
    seed: int = DEFAULT_SEED,
) -> dict[str, str]:
    """One box + strip plot (PNG) per measurement, each written atomically.

    Parameters
    ----------
    table, result
        The table and its comparison.
    out_dir : path-like
        Folder for the PNGs (created).
    seed : int
        Seed of the strip jitter.

    Returns
    -------
    dict
        Measurement name -> file name inside ``out_dir``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mskmri.io import atomic_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    order = [result.reference, result.other]
    for c in result.comparisons:
        rng = np.random.default_rng([int(seed), zlib.crc32(c.name.encode("utf-8"))])
        data = [table.group_values(c.name, g) for g in order]
        fig = Figure(figsize=PLOT_SIZE_INCHES)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        nonempty = [i for i, d in enumerate(data) if d.size]
        if nonempty:
            ax.boxplot([data[i] for i in nonempty], positions=[i + 1 for i in nonempty],
                       widths=0.5, showfliers=False)
        for i, d in enumerate(data):
            x = i + 1 + rng.uniform(-STRIP_JITTER * 2, STRIP_JITTER * 2, size=d.size)
            ax.plot(x, d, "o", ms=4, alpha=0.6, color=f"C{i}")
        ax.set_xticks([1, 2])
        ax.set_xticklabels([f"{g}\n(n={d.size})" for g, d in zip(order, data, strict=True)])
        ax.set_xlim(0.4, 2.6)
        ax.set_ylabel(f"{c.name} [{c.unit}]")
        pw = c.welch.p_holm
        pu = c.mann_whitney.p_holm
        ax.set_title(
            f"{c.name}\nWelch p(Holm) {_fmt_p(pw)}, Mann-Whitney p(Holm) {_fmt_p(pu)}",
            fontsize=9,
        )
        fig.tight_layout()
        name = plot_file_name(c.name)
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, dpi=PLOT_DPI, format="png")
        written[c.name] = name
    return written


def _fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def stats_files(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    group: str,
    manifest: str | os.PathLike[str] | None = None,
    group_from: str | None = None,
    groups: Sequence[str] | None = None,
    plots_dir: str | os.PathLike[str] | None = None,
    alpha: float = ALPHA,
    n_bootstrap: int = N_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Read a CSV table or measurements JSON files, compare the groups, plot; the document.

    Parameters
    ----------
    inputs : sequence of path-like
        One ``.csv`` table, or measurements JSON files and/or folders of them.
    group : str
        Group column (CSV / manifest), or the name given to the grouping variable.
    manifest : path-like, optional
        For JSON input: CSV with columns ``file`` and ``group`` giving each file's group.
    group_from : {"parent"}, optional
        For JSON input: the group is the name of the folder holding each file.
    groups : (str, str), optional
        ``(reference, other)``.
    plots_dir : path-like, optional
        Where to write one PNG per measurement.
    alpha, n_bootstrap, seed
        See :func:`compare_groups`.
    """
    from mskmri import __version__

    paths = [Path(p) for p in inputs]
    if not paths:
        raise TableError("give a CSV table or measurements JSON files")
    if len(paths) == 1 and paths[0].suffix.lower() == ".csv":
        if manifest is not None or group_from is not None:
            raise TableError("--manifest and --group-from are for JSON input; a CSV table "
                             "holds its own group column")
        table = read_table_csv(paths[0], group=group)
    else:
        if any(p.suffix.lower() == ".csv" for p in paths):
            raise TableError("give either one CSV table or measurements JSON files, not both")
        files = collect_measurement_files(paths)
        if (manifest is None) == (group_from is None):
            raise TableError(
                "for measurements JSON files, say where each subject's group comes from: "
                "--manifest CSV (columns file,<group>) or --group-from parent (folder name)"
            )
        if manifest is not None:
            lookup = _manifest_lookup(read_manifest(manifest, group=group),
                                      Path(manifest).resolve().parent)
        elif group_from == "parent":
            def lookup(f: Path) -> str:
                return f.resolve().parent.name
        else:
            raise TableError(f"unknown --group-from rule {group_from!r} (known: parent)")
        table = table_from_measurements(files, group_of=lookup, group_column=group)
    result = compare_groups(table, groups=groups, alpha=alpha, n_bootstrap=n_bootstrap,
                            seed=seed)
    plots = None
    if plots_dir is not None:
        plots = plot_comparisons(table, result, plots_dir, seed=seed)
    return stats_document(result, table=table, tool_version=__version__, plots=plots)
