"""One geometry-aware volume type: an array and a 4x4 affine in RAS+ world coordinates.

Convention (stated once): the affine maps voxel indices ``(i, j, k, 1)`` to world
coordinates ``(x, y, z, 1)`` in millimetres in the RAS+ frame, as nibabel uses it: +x points
to the patient's Right, +y Anterior, +z Superior. Axis codes are nibabel's ``aff2axcodes``
letters: an array axis labelled ``"R"`` increases towards the patient's right. DICOM's LPS+
(+x Left, +y Posterior) is converted once, at the reader, with :data:`LPS_TO_RAS`.

Spacing, orientation codes, origin and voxel volume are always derived from the affine,
never stored twice. Volumes whose source had no geometry (a NIfTI without qform/sform, a raw
array) carry ``geometry_known=False``; measurements refuse them rather than assume 1 mm.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from mskmri.errors import DimensionError, GeometryError

#: DICOM patient coordinates are LPS+; multiply on the left to get RAS+.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Default absolute tolerance (mm, and unitless for direction cosines) of ``same_geometry``.
GEOMETRY_ATOL = 1e-3


def _check_affine(affine: npt.ArrayLike) -> np.ndarray:
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise GeometryError(f"affine must have shape (4, 4), not {aff.shape}")
    if not np.all(np.isfinite(aff)):
        raise GeometryError("affine holds NaN or infinite values; the file's geometry is broken")
    if not np.allclose(aff[3], [0, 0, 0, 1]):
        raise GeometryError(f"affine's last row must be [0, 0, 0, 1], not {aff[3].tolist()}")
    if abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise GeometryError("affine is singular (a zero spacing or parallel axes)")
    return aff


class Volume:
    """A 3-D image: array + 4x4 RAS+ affine + metadata.

    Parameters
    ----------
    array : (I, J, K) ndarray
        Voxel values; axis ``n`` is the affine's column ``n``.
    affine : (4, 4) array_like
        Voxel index -> RAS+ world coordinates in mm.
    meta : mapping, optional
        Free metadata (source path, series UID, echo time in ms, ...). Copied.
    geometry_known : bool, default True
        False when the source carried no geometry; the affine is then a placeholder and no
        physical measurement may be made from it.

    Notes
    -----
    Not a subclass of ndarray or Tensor on purpose (see STYLE.md #1). ``array`` may be any
    numeric dtype; operations that interpolate return float32.
    """

    __slots__ = ("array", "affine", "meta", "geometry_known")

    def __init__(
        self,
        array: npt.ArrayLike,
        affine: npt.ArrayLike,
        meta: Mapping[str, Any] | None = None,
        *,
        geometry_known: bool = True,
    ) -> None:
        arr = np.asarray(array)
        if arr.ndim != 3:
            raise DimensionError(
                f"a volume must be 3-D, not {arr.ndim}-D with shape {arr.shape}; "
                "give a 3-D image (a single slice cannot be used here)"
            )
        self.array: np.ndarray = arr
        self.affine: np.ndarray = _check_affine(affine)
        self.meta: dict[str, Any] = dict(meta or {})
        self.geometry_known: bool = bool(geometry_known)

    # ------------------------------------------------------------------ derived geometry
    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(I, J, K)``."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along each array axis, in mm (norms of the affine's columns)."""
        sp = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(sp[0]), float(sp[1]), float(sp[2]))

    @property
    def origin(self) -> tuple[float, float, float]:
        """World coordinate (RAS+, mm) of the centre of voxel (0, 0, 0)."""
        o = self.affine[:3, 3]
        return (float(o[0]), float(o[1]), float(o[2]))

    @property
    def direction(self) -> np.ndarray:
        """(3, 3) unit direction cosines, one column per array axis (RAS+)."""
        return self.affine[:3, :3] / np.asarray(self.spacing)[None, :]

    @property
    def orientation(self) -> tuple[str, str, str]:
        """Axis codes (nibabel convention): the RAS+ direction each array axis increases to."""
        import nibabel.orientations as nio

        return tuple(nio.aff2axcodes(self.affine))  # type: ignore[return-value]

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm^3 (|det| of the affine's 3x3 part)."""
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    def require_geometry(self, what: str = "this measurement") -> None:
        """Raise :class:`GeometryError` when the geometry is unknown (no spacing, no measure)."""
        if not self.geometry_known:
            src = self.meta.get("source", "the input")
            raise GeometryError(
                f"{src} has no voxel spacing or orientation, so {what} cannot be made; "
                "give an image with its geometry (NIfTI with qform/sform, NRRD, MHA or DICOM)"
            )

    def require_3d(self, what: str = "this step") -> None:
        """Raise :class:`DimensionError` when the source was a single 2-D slice."""
        if self.meta.get("was_2d") or 1 in self.shape:
            src = self.meta.get("source", "the input")
            raise DimensionError(
                f"{src} is a 2-D image (shape {self.shape}), but {what} needs a 3-D volume; "
                "give the whole series or a 3-D file"
            )

    # ------------------------------------------------------------------ construction helpers
    def with_array(self, array: npt.ArrayLike, **meta_updates: Any) -> Volume:
        """A new volume with the same geometry and class, holding ``array`` (same shape)."""
        arr = np.asarray(array)
        if arr.shape != self.array.shape:
            raise DimensionError(f"array shape {arr.shape} does not match volume {self.shape}")
        out = copy.copy(self)
        out.array = arr
        out.meta = {**self.meta, **meta_updates}
        return out

    def copy(self) -> Volume:
        """A deep copy (array, affine and metadata)."""
        out = copy.copy(self)
        out.array = self.array.copy()
        out.affine = self.affine.copy()
        out.meta = copy.deepcopy(self.meta)
        return out

    # ------------------------------------------------------------------ geometry operations
    def same_geometry(self, other: Volume, *, atol: float = GEOMETRY_ATOL) -> bool:
        """True when ``other`` has the same shape and affine (within ``atol`` mm / cosine)."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol))

    def world_to_voxel(self, points: npt.ArrayLike) -> np.ndarray:
        """(N, 3) world RAS+ mm -> (N, 3) continuous voxel indices."""
        pts = np.atleast_2d(np.asarray(points, dtype=np.float64))
        inv = np.linalg.inv(self.affine)
        return pts @ inv[:3, :3].T + inv[:3, 3]

    def voxel_to_world(self, indices: npt.ArrayLike) -> np.ndarray:
        """(N, 3) voxel indices -> (N, 3) world RAS+ mm."""
        idx = np.atleast_2d(np.asarray(indices, dtype=np.float64))
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def reorient(self, codes: str | Sequence[str] = "RAS") -> Volume:
        """Permute/flip axes (no interpolation) so the array axes point along ``codes``.

        Parameters
        ----------
        codes : str or sequence of str
            Target axis codes in the nibabel convention, e.g. ``"RAS"`` or ``"LPI"``.
        """
        import nibabel.orientations as nio

        target = tuple(codes)
        current = nio.io_orientation(self.affine)
        wanted = nio.axcodes2ornt(target)
        transform = nio.ornt_transform(current, wanted)
        arr = nio.apply_orientation(self.array, transform)
        aff = self.affine @ nio.inv_ornt_aff(transform, self.array.shape)
        out = copy.copy(self)
        out.array = np.ascontiguousarray(arr)
        out.affine = aff
        out.meta = dict(self.meta)
        return out

    def crop(self, slices: Sequence[slice]) -> Volume:
        """Crop by index slices (step 1); the affine moves so world positions are unchanged."""
        if len(slices) != 3:
            raise DimensionError(f"crop needs 3 slices, not {len(slices)}")
        starts = []
        for s, n in zip(slices, self.shape, strict=True):
            start, _, step = s.indices(n)
            if step != 1:
                raise GeometryError("crop slices must have step 1")
            starts.append(start)
        aff = self.affine.copy()
        aff[:3, 3] = self.voxel_to_world([starts])[0]
        out = copy.copy(self)
        out.array = self.array[tuple(slices)]
        out.affine = aff
        out.meta = dict(self.meta)
        return out

    def pad_or_crop_to(self, bbox_start: Sequence[int], bbox_stop: Sequence[int]) -> Volume:
        """Extract ``[start, stop)`` per axis, zero-padding where it leaves the array."""
        start = np.asarray(bbox_start, dtype=int)
        stop = np.asarray(bbox_stop, dtype=int)
        out_shape = tuple(int(v) for v in stop - start)
        arr = np.zeros(out_shape, dtype=self.array.dtype)
        src_lo = np.maximum(start, 0)
        src_hi = np.minimum(stop, self.shape)
        dst_lo = src_lo - start
        dst_hi = dst_lo + (src_hi - src_lo)
        if np.all(src_hi > src_lo):
            arr[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi, strict=True))] = self.array[
                tuple(slice(a, b) for a, b in zip(src_lo, src_hi, strict=True))
            ]
        aff = self.affine.copy()
        aff[:3, 3] = self.voxel_to_world([start])[0]
        out = copy.copy(self)
        out.array = arr
        out.affine = aff
        out.meta = dict(self.meta)
        return out

    def resample_to(self, target: Volume, *, order: int | None = None, cval: float = 0.0) -> Volume:
        """Resample onto ``target``'s grid (its shape and affine).

        Parameters
        ----------
        target : Volume
            Reference geometry.
        order : int, optional
            Spline order; default 1 (linear) for images, 0 (nearest) for label maps.
        cval : float
            Value outside this volume's field of view.
        """
        return self.resample_to_grid(target.shape, target.affine, order=order, cval=cval)

    def resample_to_grid(
        self,
        shape: Sequence[int],
        affine: npt.ArrayLike,
        *,
        order: int | None = None,
        cval: float = 0.0,
    ) -> Volume:
        """Resample onto the grid ``(shape, affine)``; see :meth:`resample_to`."""
        from scipy import ndimage

        if order is None:
            order = self._default_order
        dst_aff = _check_affine(affine)
        # voxel(dst) -> world -> voxel(src)
        mapping = np.linalg.inv(self.affine) @ dst_aff
        # "grid-constant": each voxel covers its box (index +- 0.5) and cval lies beyond it.
        # Plain "constant" returns cval for any point even 1e-15 outside [0, n-1], so an
        # identity resample of an oblique volume lost its border voxels to round-off.
        if order == 0:
            arr = ndimage.affine_transform(
                self.array, mapping[:3, :3], offset=mapping[:3, 3], output_shape=tuple(shape),
                order=0, mode="grid-constant", cval=cval, prefilter=False,
            )
        else:
            arr = ndimage.affine_transform(
                self.array.astype(np.float32, copy=False), mapping[:3, :3], offset=mapping[:3, 3],
                output_shape=tuple(shape), order=order, mode="grid-constant", cval=cval,
                prefilter=order > 1,
            )
        out = copy.copy(self)
        out.array = arr
        out.affine = dst_aff
        out.meta = dict(self.meta)
        return out

    def resample(
        self, spacing: Sequence[float], *, order: int | None = None
    ) -> Volume:
        """Resample to a new voxel ``spacing`` (mm) keeping orientation and field of view.

        The grid keeps the first voxel corner and the direction cosines; the new shape is
        ``round(shape * old_spacing / new_spacing)``.
        """
        old = np.asarray(self.spacing)
        new = np.asarray(spacing, dtype=np.float64)
        if new.shape != (3,) or np.any(new <= 0):
            raise GeometryError(f"spacing must be 3 positive numbers in mm, not {spacing!r}")
        shape = np.maximum(1, np.round(np.asarray(self.shape) * old / new)).astype(int)
        direction = self.direction
        # keep the outer corner of voxel 0 fixed: centre moves by half a voxel difference
        corner = self.voxel_to_world([[-0.5, -0.5, -0.5]])[0]
        aff = np.eye(4)
        aff[:3, :3] = direction * new[None, :]
        aff[:3, 3] = corner + aff[:3, :3] @ np.full(3, 0.5)
        return self.resample_to_grid(shape, aff, order=order)

    @property
    def _default_order(self) -> int:
        return 1

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.4g}" for s in self.spacing)
        return (
            f"{type(self).__name__}(shape={self.shape}, spacing=({sp}) mm, "
            f"orientation={''.join(self.orientation)}, dtype={self.array.dtype})"
        )


class LabelVolume(Volume):
    """An integer label map in some geometry, with the names of its values.

    Parameters
    ----------
    array : (I, J, K) integer ndarray
    affine : (4, 4) array_like
    labels : mapping of int to str
        Value -> structure name for every non-zero value that may appear.
    schema : str
        Name of the label schema (``"knee"``, ``"spine"``, ``"lesion"``, or a source name).
    meta, geometry_known
        As for :class:`Volume`.

    Resampling is nearest-neighbour by default.
    """

    __slots__ = ("labels", "schema")

    def __init__(
        self,
        array: npt.ArrayLike,
        affine: npt.ArrayLike,
        labels: Mapping[int, str] | None = None,
        *,
        schema: str = "custom",
        meta: Mapping[str, Any] | None = None,
        geometry_known: bool = True,
    ) -> None:
        arr = np.asarray(array)
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                raise GeometryError("a label map must hold whole numbers, not fractional values")
            arr = arr.astype(np.int32)
        elif arr.dtype.kind == "b":
            arr = arr.astype(np.uint8)
        elif arr.dtype.kind not in "iu":
            raise GeometryError(f"a label map must be integer, not {arr.dtype}")
        super().__init__(arr, affine, meta, geometry_known=geometry_known)
        self.labels: dict[int, str] = {int(k): str(v) for k, v in (labels or {}).items()}
        self.schema: str = schema

    @property
    def _default_order(self) -> int:
        return 0

    def copy(self) -> LabelVolume:
        out = super().copy()
        assert isinstance(out, LabelVolume)
        out.labels = dict(self.labels)
        return out

    def present_values(self) -> list[int]:
        """Sorted non-zero values present in the array."""
        vals = np.unique(self.array)
        return [int(v) for v in vals if v != 0]

    def unknown_values(self) -> list[int]:
        """Non-zero values present in the array that ``labels`` does not name."""
        return [v for v in self.present_values() if v not in self.labels]

    def mask(self, *values: int) -> np.ndarray:
        """Boolean mask of the voxels holding any of ``values``."""
        return np.isin(self.array, np.asarray(values, dtype=self.array.dtype))

    def sidecar(self) -> dict[str, Any]:
        """The JSON sidecar written next to every label map: schema and value names."""
        return {
            "schema": "mskmri/labelmap/1",
            "label_schema": self.schema,
            "labels": {str(k): v for k, v in sorted(self.labels.items())},
        }
