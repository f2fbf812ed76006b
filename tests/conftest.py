import gzip
import hashlib
import json
import os
import pathlib

import nibabel as nib
import numpy as np
import pytest

from pipeline.example import nibabel_data_file


def digest(path):
    """SHA-256 of a file's bytes (hashlib, independent of pipeline.provenance)."""
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def first_difference(a: bytes, b: bytes):
    """Offset of the first byte where ``a`` and ``b`` differ (the shorter length if one is a prefix), or None."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.frombuffer(a, np.uint8, n) != np.frombuffer(b, np.uint8, n))
    return int(diff[0]) if diff.size else (None if len(a) == len(b) else n)


def why_gzip_differs(a: bytes, b: bytes) -> str:
    """For a failed byte-identity check of two gzip files: where they differ, and whether what they
    hold differs too, or only the compressed bytes (the compressor parsed the same data differently)."""
    da, db = gzip.decompress(a), gzip.decompress(b)
    held = "the same data" if da == db else f"different data from byte {first_difference(da, db)} of {len(da)}"
    return f"{len(a)} and {len(b)} bytes, first different byte {first_difference(a, b)}; decompressed they hold {held}"


def _why_nifti_differs(a: bytes, b: bytes) -> str:
    """Which header fields of two NIfTI images differ, and by how much their voxels do."""
    ia, ib = nib.Nifti1Image.from_bytes(a), nib.Nifti1Image.from_bytes(b)

    def same(k):
        try:
            return np.array_equal(ia.header[k], ib.header[k], equal_nan=True)  # unset scl_slope is NaN
        except TypeError:  # text fields
            return np.array_equal(ia.header[k], ib.header[k])

    fields = [k for k in ia.header.keys() if not same(k)]
    if ia.shape != ib.shape:
        return f"header fields {fields}; shapes {ia.shape} and {ib.shape}"
    xa, xb = np.asanyarray(ia.dataobj, np.float64), np.asanyarray(ib.dataobj, np.float64)
    differ = ~((xa == xb) | (np.isnan(xa) & np.isnan(xb)))
    worst = float(np.nanmax(np.abs(xa - xb)[differ])) if differ.any() else 0.0
    return f"header fields that differ: {fields or 'none'}; {int(differ.sum())} voxels differ, by up to {worst:g}"


def why_files_differ(a, b) -> str:
    """For a failed byte-identity check of two output files (paths): their names, and what differs:
    for gzip, whether the data held differ too (:func:`why_gzip_differs`); for JSON, the keys whose
    values differ. The message is what is left to go on when a rare failure does not come back."""
    a, b = pathlib.Path(a), pathlib.Path(b)
    ba, bb = a.read_bytes(), b.read_bytes()
    if ba == bb:
        return f"{a} and {b} are identical"
    if ba[:2] == bb[:2] == b"\x1f\x8b":
        what = why_gzip_differs(ba, bb)
        if a.name.endswith(".nii.gz"):
            da, db = gzip.decompress(ba), gzip.decompress(bb)
            if da != db:
                what += "; " + _why_nifti_differs(da, db)
    elif a.suffix == ".json":
        ja, jb = json.loads(ba), json.loads(bb)
        keys = sorted(k for k in ja.keys() | jb.keys() if ja.get(k) != jb.get(k))
        what = "; ".join(f"{k}: {ja.get(k)!r} != {jb.get(k)!r}" for k in keys) or "same values, other bytes"
    else:
        what = f"{len(ba)} and {len(bb)} bytes, first different byte {first_difference(ba, bb)}"
    return f"{a} != {b}: {what}"


def assert_same_bytes(a, b) -> None:
    """Files ``a`` and ``b`` hold the same bytes; if not, the failure says what differs."""
    assert pathlib.Path(a).read_bytes() == pathlib.Path(b).read_bytes(), why_files_differ(a, b)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def nib_data():
    """Path of one of nibabel's bundled test images."""

    def get(name):
        return str(nibabel_data_file(name))

    return get


def oblique_affine(voxel_mm=(1.0, 2.0, 3.0), angles=(0.3, -0.2, 0.5), origin=(-20.0, 10.0, 5.0)):
    """An affine with anisotropic voxels and a rotation about all three axes."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ ry @ rx @ np.diag(voxel_mm)
    aff[:3, 3] = origin
    return aff


def filter_params(name, tmp_path):
    """Parameters that make each filter run: a Gaussian's width, and for ``kernel`` a kernel file
    without symmetry (a wrong axis order or flip shows)."""
    if name == "gaussian":
        return {"fwhm_mm": 4.0}
    if name == "kernel":
        np.save(tmp_path / "k.npy", np.arange(3 * 5 * 3, dtype=float).reshape(3, 5, 3) - 20)
        return {"kernel_file": str(tmp_path / "k.npy")}
    return {}


@pytest.fixture
def write_nifti(tmp_path):
    """Write an array as NIfTI under tmp_path and return the path."""

    def write(data, name="img.nii.gz", affine=None, klass=nib.Nifti1Image, **header):
        img = klass(np.asarray(data), np.eye(4) if affine is None else affine)
        for key, value in header.items():
            img.header[key] = value
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, path)
        return str(path)

    return write


def gpu_ready():
    from pipeline.backend import gpu_available

    return gpu_available()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("VOLFILTER_REQUIRE_GPU"):
        return
    skip = None
    for item in items:
        if "gpu" in item.keywords:
            if skip is None:
                skip = pytest.mark.skip(reason="CuPy or a CUDA device is not available") if not gpu_ready() else False
            if skip:
                item.add_marker(skip)
