"""Make ``benchmarks/results/figures/real-data/synth_vs_real.png``: real knees next to our
renders (local only: it shows slices of the real scans, which are never committed).

Mid-sagittal slices, each shown over the same physical field of view with its true aspect:
real GE 3T DESS echo 1 (pyKNEEr), real GE 3T multi-echo spin-echo T2-map series first echo
(pymskt), and our renders from a held-out OAI label map (DESS, PD-like, IW-FS with an
inserted BML) and of the no-input phantom. Needs ``../shared/data`` (real images are read
here and only drawn into the figure; nothing else is written).

Usage::

    .venv/bin/python benchmarks/synth_figure.py [--out FILE]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("benchmarks.synth_figure")

#: Field of view (mm) shown in every panel, square, centred on the knee.
PANEL_FOV_MM = 130.0


def _read_mese_first_echo(folder: Path):
    """The first echo of the MESE series as a RAS Volume (pydicom; LPS -> RAS at the edge)."""
    import pydicom

    from mskmri.volume import LPS_TO_RAS, Volume

    dss = [pydicom.dcmread(str(p)) for p in sorted(folder.glob("*.dcm"))]
    te0 = min(float(d.EchoTime) for d in dss)
    sel = [d for d in dss if abs(float(d.EchoTime) - te0) < 1e-3]
    iop = np.asarray(sel[0].ImageOrientationPatient, dtype=float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    sel.sort(key=lambda d: float(normal @ np.asarray(d.ImagePositionPatient, dtype=float)))
    # array axes: (slice, row index, column index); columns advance along `row`, rows along `col`
    arr = np.stack([d.pixel_array.astype(np.float32) for d in sel])
    ps = [float(v) for v in sel[0].PixelSpacing]
    p0 = np.asarray(sel[0].ImagePositionPatient, dtype=float)
    p1 = np.asarray(sel[1].ImagePositionPatient, dtype=float)
    aff = np.eye(4)
    aff[:3, 0] = p1 - p0
    aff[:3, 1] = col * ps[0]
    aff[:3, 2] = row * ps[1]
    aff[:3, 3] = p0
    return Volume(arr, LPS_TO_RAS @ aff, {"source": str(folder)})


def _mid_sagittal(vol, *, x_frac: float = 0.5, window: tuple[float, float] = (0.5, 99.7)):
    """(image, extent) of a sagittal slice at ``x_frac`` of the L-R extent, cropped to the
    panel field of view around the slice's bright centre, anterior to the right."""
    ras = vol.reorient("RAS")
    a = ras.array.astype(np.float32)
    x = int(round(x_frac * (a.shape[0] - 1)))
    sl = a[x]  # (y, z)
    sy, sz = ras.spacing[1], ras.spacing[2]
    lo, hi = np.percentile(a, window)
    img = np.clip((sl - lo) / max(hi - lo, 1e-6), 0, 1)
    cy = sl.shape[0] * sy / 2.0
    cz = sl.shape[1] * sz / 2.0
    half = PANEL_FOV_MM / 2.0
    extent = (cy - half, cy + half, cz - half, cz + half)
    return img.T, (0.0, sl.shape[0] * sy, 0.0, sl.shape[1] * sz), extent


def make_figure(out: Path, shared: Path, *, label_map: str = "zib_9007827.nii.gz",
                seed: int = 3) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mskmri.io import atomic_path, read
    from mskmri.synth import phantom_knee, render
    from mskmri.synth.render import RenderOptions
    from mskmri.synth.sources import load_knee_source

    knee = shared / "knee"
    real_dess = read(knee / "pykneer_dess" / "sub01_DESS_echo01.nii.gz")
    real_mese = _read_mese_first_echo(knee / "pymskt_mese_t2_dicom")
    src = load_knee_source(knee / "oai_bone_lesion_labels" / label_map)
    calm = RenderOptions(thick_slice_probability=0.0, rotation_deg=3.0, noise=(0.015, 0.02),
                         bias_std=(0.15, 0.2), gamma_std=0.0)
    ours = {}
    for c, extra in (("dess", {}), ("pd", {}), ("iw-fs", {"lesion_ml": [2.0]})):
        r = render(src.labels, lesions=src.lesions, contrast=c, seed=seed, effusion_ml=6.0,
                   options=calm, **extra)
        ours[c] = r
        log.info("rendered %s in %.1f s", c, r.params["timing"]["total_s"])
    ph_labels, ph_lesions = phantom_knee(seed=0)
    ph = render(ph_labels, lesions=ph_lesions, contrast="dess", seed=seed, options=calm)
    # the IW-FS panel is cut through the inserted lesion
    les = ours["iw-fs"].lesions.reorient("RAS").array
    xl = float(np.argwhere(les).mean(0)[0] / (les.shape[0] - 1)) if les.any() else 0.5
    panels = [
        ("real DESS (pyKNEEr, GE 3T)", real_dess, 0.5),
        ("real MESE T2 map, 1st echo (pymskt)", real_mese, 0.5),
        ("ours: DESS (OAI labels)", ours["dess"].image, 0.5),
        ("ours: PD, no fat-sat (OAI labels)", ours["pd"].image, 0.5),
        ("ours: IW-FS + 2 mL BML", ours["iw-fs"].image, xl),
        ("ours: phantom (no input), DESS", ph.image, 0.33),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13.5, 9.6))
    for ax, (title, vol, xf) in zip(axes.ravel(), panels, strict=True):
        img, ext, view = _mid_sagittal(vol, x_frac=xf)
        ax.imshow(img, cmap="gray", origin="lower", extent=ext, vmin=0, vmax=1,
                  interpolation="antialiased")
        ax.set_xlim(view[0], view[1])
        ax.set_ylim(view[2], view[3])
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Label-map synthesis vs real knee MRI (mid-sagittal, anterior right, "
                 f"{PANEL_FOV_MM:.0f} mm field of view)", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return out


def main() -> None:
    from mskmri.paths import REPO_ROOT, shared_data_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "figures"
                   / "real-data" / "synth_vs_real.png")
    p.add_argument("--seed", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shared = shared_data_dir()
    if shared is None:
        raise SystemExit("needs ../shared/data (or MSKMRI_SHARED_DATA)")
    log.info("wrote %s", make_figure(args.out, shared, seed=args.seed))


if __name__ == "__main__":
    main()
