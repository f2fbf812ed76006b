"""The bad-input matrix: every case exits non-zero with one clear line, writes nothing,
and leaves the input bytes unchanged (CLI); the workflow isolates a bad subject."""

import gzip
import os
import pathlib
import time

import nibabel as nib
import numpy as np
import pytest
from conftest import digest

from pipeline.cli import main


def sha(path):
    return digest(path) if os.path.isfile(path) else None


def header_only(path, shape, zooms=None):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(np.eye(4), code=1)
    hdr.set_sform(np.eye(4), code=1)
    if zooms is not None:
        hdr["pixdim"][1:4] = zooms
    with open(path, "wb") as fh:
        hdr.write_to(fh)
        fh.write(b"\0" * 4)
        fh.write(np.ones(int(np.prod(shape)) if zooms is not None else 0, np.float32).tobytes())


def make_case(name, d, nib_data):
    """Build the bad input of case ``name`` in folder ``d``; return (input, extra CLI args)."""
    good = nib_data("anatomical.nii")
    p = d / "in.nii.gz"
    if name == "truncated gz":
        data = pathlib.Path(nib_data("example4d.nii.gz")).read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif name == "damaged data, intact gzip trailer":  # noise deflates to stored blocks: only the CRC-32 tells
        nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(24, 24, 24)).astype(np.float32), np.eye(4)), p)
        data = bytearray(p.read_bytes())
        at = len(data) * 3 // 4
        data[at : at + 64] = bytes(64)
        p.write_bytes(bytes(data))
    elif name == "random bytes named .nii.gz":
        p.write_bytes(os.urandom(3000))
    elif name == "gzip of random bytes":
        p.write_bytes(gzip.compress(os.urandom(3000)))
    elif name == "uncompressed named .gz":
        p.write_bytes(pathlib.Path(good).read_bytes())
    elif name == "empty file":
        p.write_bytes(b"")
    elif name == "header claims more data than the file holds":
        p = d / "in.nii"
        p.write_bytes(pathlib.Path(good).read_bytes()[:-1000])
    elif name == "header claims 30000^3 voxels":
        p = d / "in.nii"
        header_only(p, (30000, 30000, 30000))
    elif name == "2-D image":
        nib.save(nib.Nifti1Image(np.ones((5, 5), np.float32), np.eye(4)), p)
    elif name == "5-D image":
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 2, 3), np.float32), np.eye(4)), p)
    elif name == "zero voxel size":
        p = d / "in.nii"
        header_only(p, (4, 4, 4), zooms=(1.0, 0.0, 1.0))
    elif name == "negative voxel size":
        p = d / "in.nii"
        header_only(p, (4, 4, 4), zooms=(1.0, -1.0, 1.0))
    elif name == "all NaN volume":
        nib.save(nib.Nifti1Image(np.full((4, 4, 4), np.nan, np.float32), np.eye(4)), p)
    elif name == "all Inf volume":
        nib.save(nib.Nifti1Image(np.full((4, 4, 4), np.inf, np.float32), np.eye(4)), p)
    elif name == "mask of wrong shape":
        p.write_bytes(pathlib.Path(nib_data("example4d.nii.gz")).read_bytes())
        nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), np.eye(4)), d / "mask.nii.gz")
        return p, ["--mask", str(d / "mask.nii.gz")]
    elif name == "mask of wrong orientation":
        src = nib.load(good)
        p.write_bytes(gzip.compress(pathlib.Path(good).read_bytes(), mtime=0))
        flipped = src.affine @ np.diag([-1, 1, 1, 1])
        nib.save(nib.Nifti1Image(np.ones(src.shape, np.uint8), flipped), d / "mask.nii.gz")
        return p, ["--mask", str(d / "mask.nii.gz")]
    elif name == "missing mask":
        p.write_bytes(gzip.compress(pathlib.Path(good).read_bytes(), mtime=0))
        return p, ["--mask", str(d / "nomask.nii.gz")]
    elif name == "kernel not odd-sized":
        p.write_bytes(gzip.compress(pathlib.Path(good).read_bytes(), mtime=0))
        (d / "k.txt").write_text("1 1\n1 1\n")
        return p, ["--filter", "kernel", "--kernel-file", str(d / "k.txt")]
    elif name == "kernel not numeric":
        p.write_bytes(gzip.compress(pathlib.Path(good).read_bytes(), mtime=0))
        (d / "k.txt").write_text("1 x 1\n")
        return p, ["--filter", "kernel", "--kernel-file", str(d / "k.txt")]
    elif name == "not a NIfTI name":
        p = d / "in.txt"
        p.write_text("hello")
    elif name == "missing input":
        p = d / "nothere.nii.gz"
    else:  # pragma: no cover
        raise KeyError(name)
    return p, []


CASES = {
    "truncated gz": "truncated",
    "damaged data, intact gzip trailer": "corrupt",
    "random bytes named .nii.gz": "not gzip-compressed",
    "gzip of random bytes": "not a NIfTI",
    "uncompressed named .gz": "not gzip-compressed",
    "empty file": "empty file",
    "header claims more data than the file holds": "truncated",
    "header claims 30000^3 voxels": "GiB",
    "2-D image": "2-D",
    "5-D image": "5-D",
    "zero voxel size": "must be positive",
    "negative voxel size": "must be positive",
    "all NaN volume": "NaN or infinite",
    "all Inf volume": "NaN or infinite",
    "mask of wrong shape": "shape",
    "mask of wrong orientation": "affine",
    "missing mask": "no such file",
    "kernel not odd-sized": "odd",
    "kernel not numeric": "not a numeric",
    "not a NIfTI name": ".nii",
    "missing input": "no such file",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_no_output(case, tmp_path, nib_data, capsys):
    d = tmp_path / "in"
    d.mkdir()
    src, extra = make_case(case, d, nib_data)
    before = {f: sha(d / f) for f in os.listdir(d)}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["apply", str(src), str(out_dir / "o.nii.gz")]
    if "--filter" not in extra:
        args += ["--filter", "gaussian", "--fwhm-mm", "4"]
    t = time.perf_counter()
    rc = main(args + extra)
    elapsed = time.perf_counter() - t
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("volfilter: error: ") and err.count("\n") == 1, err
    assert CASES[case].lower() in err.lower(), err
    assert os.listdir(out_dir) == []
    assert {f: sha(d / f) for f in os.listdir(d)} == before
    if case == "header claims 30000^3 voxels":
        assert elapsed < 5  # refused from the header; generous bound for a loaded CI machine


def test_unwritable_output_folder(nib_data, tmp_path, capsys):
    # /proc refuses new files even to root.
    rc = main(["apply", nib_data("anatomical.nii"), "/proc/volfilter-test.nii.gz", "--filter", "identity"])
    err = capsys.readouterr().err
    assert (
        rc == 2
        and err.startswith("volfilter: error: /proc/volfilter-test.nii.gz: cannot write")
        and err.count("\n") == 1
    )


@pytest.mark.parametrize("name", ["with space.nii.gz", "ünïcødé_T1w.nii.gz", "a..b.nii.gz"])
def test_awkward_but_valid_names_work(name, nib_data, tmp_path, capsys):
    src = tmp_path / name
    src.write_bytes(pathlib.Path(nib_data("example4d.nii.gz")).read_bytes())
    out = tmp_path / ("out " + name)
    assert main(["apply", str(src), str(out), "--filter", "box"]) == 0, capsys.readouterr().err
    assert nib.load(out).shape == (128, 96, 24, 2)


def test_dotdot_path_is_just_a_path(nib_data, tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    src = tmp_path / "in.nii.gz"
    src.write_bytes(pathlib.Path(nib_data("example4d.nii.gz")).read_bytes())
    out = tmp_path / "sub" / ".." / "o.nii.gz"
    assert main(["apply", str(src), str(out), "--filter", "identity"]) == 0
    assert (tmp_path / "o.nii.gz").exists()
