"""Reading the next volume while the current one is filtered and written (pipeline.image.READ_AHEAD)."""

import threading

import nibabel as nib
import numpy as np
import pytest
from conftest import assert_same_bytes, digest

from pipeline import image
from pipeline.errors import VolfilterError
from pipeline.image import FilterJob, filter_files
from pipeline.io import TMP_SUFFIX

JOBS = (("gaussian", {"fwhm_mm": 3}), ("sobel", {}))


@pytest.fixture
def read_ahead(monkeypatch):
    def setting(value):
        monkeypatch.setattr(image, "READ_AHEAD", value)

    return setting


def _inputs(tmp_path, rng):
    """3-D and 4-D inputs, gzipped and not, in one batch."""
    paths = []
    for i, (shape, ext) in enumerate([((9, 8, 7), ".nii.gz"), ((6, 7, 8, 4), ".nii.gz"), ((5, 6, 7, 2), ".nii")]):
        path = tmp_path / f"in{i}{ext}"
        nib.Nifti1Image(rng.normal(100, 20, shape).astype(np.float32), np.diag([1.0, 1.5, 2.0, 1])).to_filename(path)
        paths.append(path)
    return paths


def _batch(paths, out_dir):
    out_dir.mkdir(exist_ok=True)
    return [(p, [FilterJob(k, dict(prm), str(out_dir / f"{k}{i}.nii.gz")) for k, prm in JOBS], None)
            for i, p in enumerate(paths)]  # fmt: skip


def _reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("volfilter-read")]


def test_read_ahead_writes_the_same_bytes_as_reading_in_turn(tmp_path, rng, read_ahead):
    paths = _inputs(tmp_path, rng)
    digests = {}
    for ahead in (False, True):
        read_ahead(ahead)
        out = tmp_path / f"ahead-{ahead}"
        filter_files(_batch(paths, out), backend="cpu")
        digests[ahead] = {p.name: digest(p) for p in out.iterdir() if p.suffix == ".gz"}
    assert len(digests[True]) == 6 and digests[True] == digests[False]
    # and equal to filtering each whole image on its own
    for i, path in enumerate(paths):
        expected = image.filter_image(nib.load(path), "gaussian", fwhm_mm=3, backend="cpu").get_fdata()
        np.testing.assert_array_equal(nib.load(tmp_path / "ahead-True" / f"gaussian{i}.nii.gz").get_fdata(), expected)
    assert not _reader_threads()


@pytest.mark.parametrize("ahead", [False, True])
def test_a_corrupt_later_input_leaves_the_earlier_outputs_complete(tmp_path, rng, read_ahead, ahead):
    read_ahead(ahead)
    good = _inputs(tmp_path, rng)[0]
    later = tmp_path / "later.nii.gz"
    nib.Nifti1Image(rng.normal(size=(32, 32, 32, 4)).astype(np.float32), np.eye(4)).to_filename(later)
    data = bytearray(later.read_bytes())
    middle = len(data) * 3 // 4  # noise compresses to stored blocks: this damage decodes, the CRC-32 finds it
    data[middle : middle + 64] = bytes(64)  # header and gzip trailer intact: found only when the data are read
    later.write_bytes(bytes(data))
    alone = tmp_path / "alone"
    filter_files(_batch([good], alone), backend="cpu")
    out = tmp_path / "out"
    with pytest.raises(VolfilterError, match="later.nii.gz: .*corrupt"):
        filter_files(_batch([good, later], out), backend="cpu")
    written = sorted(p.name for p in out.iterdir())
    assert written == ["gaussian0.json", "gaussian0.nii.gz", "sobel0.json", "sobel0.nii.gz"]
    for n in (n for n in written if n.endswith(".gz")):
        assert_same_bytes(out / n, alone / n)
    assert not any(TMP_SUFFIX in n for n in written) and not _reader_threads()


def test_a_failure_while_the_next_input_is_read_stops_the_reader(tmp_path, rng, read_ahead):
    read_ahead(True)
    nan = tmp_path / "nan.nii.gz"
    nib.Nifti1Image(np.full((8, 8, 8), np.nan, np.float32), np.eye(4)).to_filename(nan)
    big = tmp_path / "big.nii.gz"  # still being read when the first input fails
    nib.Nifti1Image(rng.normal(size=(96, 96, 96)).astype(np.float32), np.eye(4)).to_filename(big)
    out = tmp_path / "out"
    with pytest.raises(VolfilterError, match="every voxel is NaN"):
        filter_files(_batch([nan, big], out), backend="cpu")
    assert list(out.iterdir()) == [] and not _reader_threads()


def test_read_ahead_follows_the_thread_setting(monkeypatch):
    monkeypatch.setattr(image, "READ_AHEAD", None)
    for threads, ahead in ((1, False), (2, False), (4, True)):  # --threads N
        monkeypatch.setattr(image.io, "GZIP_THREADS", threads)
        assert image._read_ahead() is ahead
