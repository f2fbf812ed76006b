"""Large ``.nii.gz`` inputs are decompressed on several threads (rapidgzip) and every byte is checked.

The serial reader (ISA-L, or the standard library) is the reference: the parallel path must give
the same arrays, refuse the same damaged files, and never pass on data that the file's gzip trailer
or the serial reader contradicts, whatever the parallel decoder itself reports.
"""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from pipeline import VolfilterError
from pipeline import io as vio


@pytest.fixture
def parallel(monkeypatch):
    """Every .nii.gz read in parallel on two threads, whatever its size."""
    monkeypatch.setattr(vio, "PARALLEL_READ_MIN", 0)
    monkeypatch.setattr(vio, "GZIP_THREADS", 2)


@pytest.fixture
def series_gz(tmp_path, rng):
    path = tmp_path / "bold.nii.gz"
    data = rng.normal(500, 50, (40, 36, 24, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([3, 3, 3.5, 1])), path)
    return path, data


def serial_load(path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(vio, "_rapidgzip", None)
        return vio.load(path).data


class _Truncating:
    """A stand-in for rapidgzip that decodes correctly but drops the stream's last bytes, as
    rapidgzip can for a file cut inside its deflate stream (its issue #71)."""

    def __init__(self, drop=0, flip=None, fail_after=None):
        self.drop, self.flip, self.fail_after = drop, flip, fail_after

    def open(self, path, parallelization):
        data = bytearray(gzip.open(path, "rb").read())
        if self.flip is not None:
            data[self.flip] ^= 0x40
        return _FakeReader(bytes(data[: len(data) - self.drop]), self.fail_after)


class _FakeReader:
    def __init__(self, data, fail_after):
        self.data, self.pos, self.fail_after = data, 0, fail_after

    def readinto(self, view):
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise RuntimeError("simulated decoder failure")
        n = min(len(view), len(self.data) - self.pos)
        view[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def seek(self, offset, whence=0):
        self.pos = offset
        return offset

    def close(self):
        pass


def test_parallel_and_serial_reads_agree(series_gz, parallel, monkeypatch, tmp_path):
    pytest.importorskip("rapidgzip")
    path, data = series_gz
    ours = tmp_path / "ours.nii.gz"
    vio.save(vio.derived_image(data, nib.load(path)), ours)
    for p in (path, ours):  # nibabel's gzip stream and ours
        got = vio.load(p).data
        assert_array_equal(got, data)
        assert_array_equal(got, serial_load(p, monkeypatch))
    with vio.open_volumes(path) as stream:  # volume by volume, as the series jobs read
        for t, vol in enumerate(stream.volumes):
            assert_array_equal(vol, data[..., t])


def test_the_parallel_path_is_taken_only_for_large_files_and_several_threads(series_gz, monkeypatch):
    path, _ = series_gz
    opened = []
    real = vio._CheckedParallelGzip

    def spy(p, threads):
        opened.append(threads)
        return real(p, threads)

    monkeypatch.setattr(vio, "_CheckedParallelGzip", spy)
    monkeypatch.setattr(vio, "_rapidgzip", _Truncating())
    size = os.path.getsize(path)
    for threshold, threads, parallel_expected in [(size + 1, 2, False), (size, 1, False), (size, 3, True)]:
        opened.clear()
        monkeypatch.setattr(vio, "PARALLEL_READ_MIN", threshold)
        monkeypatch.setattr(vio, "GZIP_THREADS", threads)
        vio.load(path)
        assert opened == ([threads] if parallel_expected else [])
    opened.clear()
    vio.read_header(path)  # the header alone never starts decoder threads
    assert opened == []


@pytest.mark.parametrize("drop", [1, 7, 4096])
def test_a_stream_cut_short_is_refused(series_gz, parallel, monkeypatch, tmp_path, drop):
    """The decoder hands over a short stream and reports no error. The file has 4 KiB after its
    data (NIfTI allows it), so the data itself is complete and only the check can tell: the length
    and CRC-32 kept while reading disagree with the trailer, and the serial reader disagrees too."""
    path, _ = series_gz
    tail = tmp_path / "tail.nii.gz"
    tail.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()) + bytes(4096), mtime=0))
    serial_load(tail, monkeypatch)  # a valid file
    monkeypatch.setattr(vio, "_rapidgzip", _Truncating(drop=drop))
    path = tail
    with pytest.raises(VolfilterError, match="truncated|corrupt"):
        vio.load(path)


def test_wrong_bytes_from_the_decoder_are_refused(series_gz, parallel, monkeypatch):
    path, _ = series_gz
    monkeypatch.setattr(vio, "_rapidgzip", _Truncating(flip=100_000))
    with pytest.raises(VolfilterError, match="disagree"):
        vio.load(path)


def test_a_decoder_error_hands_the_rest_to_the_serial_reader(series_gz, parallel, monkeypatch):
    path, data = series_gz
    monkeypatch.setattr(vio, "_rapidgzip", _Truncating(fail_after=60_000))
    assert_array_equal(vio.load(path).data, data)


@pytest.mark.parametrize("cut", [1, 4, 8, 9, 20, 5000, "half"])
def test_truncated_files_are_refused(series_gz, parallel, tmp_path, cut):
    pytest.importorskip("rapidgzip")
    path, _ = series_gz
    raw = path.read_bytes()
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2] if cut == "half" else raw[:-cut])
    with pytest.raises(VolfilterError, match="truncated|corrupt"):
        vio.load(bad)


@pytest.mark.parametrize("where", ["crc", "length", "middle"])
def test_damaged_files_are_refused(series_gz, parallel, tmp_path, where):
    pytest.importorskip("rapidgzip")
    path, _ = series_gz
    raw = bytearray(path.read_bytes())
    raw[{"crc": -8, "length": -3, "middle": len(raw) // 2}[where]] ^= 0x11
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(VolfilterError, match="truncated|corrupt"):
        vio.load(bad)


@pytest.mark.parametrize("layout", ["two members", "zero padding"])
def test_unusual_gzip_layouts_get_the_serial_readers_verdict(series_gz, parallel, tmp_path, monkeypatch, layout):
    """Several gzip members, or zeros after the member: whatever the serial path makes of them
    (today the header check refuses both, as their last four bytes are not the data's length),
    the parallel path does the same."""
    pytest.importorskip("rapidgzip")
    path, data = series_gz
    plain = gzip.decompress(path.read_bytes())
    other = tmp_path / "other.nii.gz"
    if layout == "two members":
        half = len(plain) // 2
        other.write_bytes(gzip.compress(plain[:half], mtime=0) + gzip.compress(plain[half:], mtime=0))
    else:
        other.write_bytes(path.read_bytes() + bytes(32))

    def outcome(load):
        try:
            return load().tobytes()
        except VolfilterError as exc:
            return str(exc)

    assert outcome(lambda: vio.load(other).data) == outcome(lambda: serial_load(other, monkeypatch))


def test_a_stream_the_trailer_does_not_describe_is_confirmed_by_the_serial_reader(series_gz, parallel, monkeypatch):
    """The trailer check fails, the serial reader decodes the same bytes: the data is accepted."""
    path, data = series_gz
    monkeypatch.setattr(vio, "_rapidgzip", _Truncating())
    asked = []

    def other_trailer(p):
        asked.append(p)
        return (0, 0)

    monkeypatch.setattr(vio, "_gzip_trailer", other_trailer)
    assert_array_equal(vio.load(path).data, data)
    assert asked == [str(path)]


def test_no_decoder_threads_are_left_running(series_gz, parallel):
    pytest.importorskip("rapidgzip")
    path, _ = series_gz
    vio.load(path)  # warm-up
    before = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None
    for _ in range(3):
        vio.load(path)
    if before is not None:
        assert len(os.listdir("/proc/self/task")) == before
