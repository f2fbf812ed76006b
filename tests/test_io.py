"""The NIfTI contract, checked with nibabel round trips on real and built images."""

import gzip
import itertools
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi
from conftest import assert_same_bytes, oblique_affine, why_gzip_differs
from numpy.testing import assert_allclose, assert_array_equal

from pipeline import VolfilterError, filter_image
from pipeline import io as vio
from pipeline.errors import GeometryWarning

TESTS = pathlib.Path(__file__).resolve().parent

GEOMETRY = ["qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
            "qoffset_z", "srow_x", "srow_y", "srow_z", "pixdim", "xyzt_units", "intent_code", "intent_p1",
            "intent_name", "dim", "slice_code", "slice_duration", "dim_info"]  # fmt: skip


def roundtrip(src_path, tmp_path, name="out.nii.gz"):
    vol = vio.load(src_path)
    out_path = tmp_path / name
    vio.save(vio.derived_image(vol.data, vol), out_path)
    assert_header_kept(src_path, out_path)
    return vol, nib.load(out_path)


def raw_header(path):
    """The header exactly as stored (nib.load hides the stored scl_slope/scl_inter)."""
    img = nib.load(path)
    with nib.openers.ImageOpener(path) as fh:
        return type(img), type(img.header).from_fileobj(fh)


def assert_header_kept(src_path, out_path):
    src_type, src = raw_header(src_path)
    out_type, out = raw_header(out_path)
    assert out_type is src_type
    assert out.get_data_dtype() == np.dtype("float32")
    for key in GEOMETRY:
        assert_array_equal(np.asarray(out[key]), np.asarray(src[key]), err_msg=key)
    assert_allclose(nib.load(out_path).affine, nib.load(src_path).affine)
    assert out.get_zooms() == pytest.approx(src.get_zooms())
    assert out.get_xyzt_units() == src.get_xyzt_units()
    assert float(out["scl_slope"]) == 1.0 and float(out["scl_inter"]) == 0.0


@pytest.mark.parametrize(
    "name", ["anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz", "standard.nii.gz", "functional.nii"]
)
@pytest.mark.parametrize("out_ext", [".nii.gz", ".nii"])
def test_real_images_roundtrip(nib_data, tmp_path, name, out_ext):
    src = nib.load(nib_data(name))
    vol, out = roundtrip(nib_data(name), tmp_path, "out" + out_ext)
    assert vol.data.dtype == np.float32
    assert_allclose(out.get_fdata(), src.get_fdata(), rtol=1e-6)
    with open(tmp_path / ("out" + out_ext), "rb") as fh:
        assert (fh.read(2) == b"\x1f\x8b") == (out_ext == ".nii.gz")


def test_tr_and_4d_shape_kept(nib_data, tmp_path):
    _, out = roundtrip(nib_data("example4d.nii.gz"), tmp_path)
    assert out.shape == (128, 96, 24, 2)
    assert out.header.get_zooms()[3] == pytest.approx(2000.0)


def test_scaling_applied_and_reset(write_nifti, tmp_path):
    raw = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(2.0, 10.0)
    path = tmp_path / "scaled.nii"
    img.to_filename(path)
    # nibabel stores our slope/inter as given; the float32 working copy applies them.
    vol = vio.load(path)
    assert vol.data.dtype == np.float32
    assert_allclose(vol.data, raw * 2.0 + 10.0)
    _, out = roundtrip(path, tmp_path)
    assert_allclose(out.get_fdata(), raw * 2.0 + 10.0)


def test_big_endian_input(tmp_path, rng):
    data = rng.normal(size=(4, 5, 6)).astype(">f4")
    img = nib.Nifti1Image(data, oblique_affine())
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=4)
    be = nib.Nifti1Image(data, img.affine, img.header.as_byteswapped(">"))
    path = tmp_path / "be.nii"
    be.to_filename(path)
    assert nib.load(path).header.endianness == ">"
    vol, out = roundtrip(path, tmp_path)
    assert_allclose(out.get_fdata(), data.astype(np.float64), rtol=1e-6)
    assert int(out.header["sform_code"]) == 4 and int(out.header["qform_code"]) == 1
    assert_allclose(out.affine, img.affine, atol=1e-5)


def test_intent_and_units_kept(tmp_path):
    img = nib.Nifti1Image(np.ones((3, 3, 3), np.float32), np.diag([1.2, 1.2, 3, 1]))
    img.header.set_intent("z score")
    img.header.set_xyzt_units("mm", "msec")
    path = tmp_path / "z.nii.gz"
    img.to_filename(path)
    _, out = roundtrip(path, tmp_path)
    assert out.header.get_intent()[0] == "z score"
    assert out.header.get_xyzt_units() == ("mm", "msec")


def test_voxel_sizes_come_from_the_affine(tmp_path):
    aff = oblique_affine((1.0, 2.0, 3.0))
    assert vio.voxel_sizes_mm(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), aff)) == pytest.approx((1, 2, 3))


@pytest.mark.parametrize(
    "unit, step, mm", [("micron", 100.0, 0.1), ("meter", 0.002, 2.0), ("mm", 2.0, 2.0), ("unknown", 2.0, 2.0)]
)
def test_voxel_sizes_follow_the_header_unit(tmp_path, unit, step, mm):
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.diag([step, step, 2 * step, 1]))
    img.header.set_xyzt_units(unit, "sec")
    img.to_filename(tmp_path / "u.nii")
    assert vio.load(tmp_path / "u.nii").voxel_mm == pytest.approx((mm, mm, 2 * mm))


def test_fwhm_in_mm_on_a_micron_header(tmp_path, rng):
    """A 100 um grid (ex vivo): FWHM 0.3 mm is 3 voxels, against scipy.ndimage; the unit is kept."""
    x = rng.normal(size=(24, 20, 16)).astype(np.float32)
    img = nib.Nifti1Image(x, np.diag([100.0, 100.0, 200.0, 1]))
    img.header.set_xyzt_units("micron", "sec")
    img.to_filename(tmp_path / "exvivo.nii.gz")
    out = filter_image(tmp_path / "exvivo.nii.gz", "gaussian", fwhm_mm=0.3, backend="cpu")
    sigma_mm = 0.3 / np.sqrt(8 * np.log(2))
    ref = ndi.gaussian_filter(x, (sigma_mm / 0.1, sigma_mm / 0.1, sigma_mm / 0.2), mode="reflect")
    assert_allclose(out.get_fdata(), ref, rtol=1e-5, atol=1e-6)
    assert out.header.get_xyzt_units() == ("micron", "sec")


def test_sheared_affine_warns_and_orthogonal_oblique_does_not(tmp_path):
    oblique = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), oblique_affine((1.0, 2.0, 3.0)))
    oblique.to_filename(tmp_path / "oblique.nii.gz")  # sform stored in float32: not exactly orthogonal
    sheared = np.eye(4)
    sheared[0, 1] = 0.2  # the second array axis leans 11.3 degrees towards the first
    nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), sheared).to_filename(tmp_path / "sheared.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vio.load(tmp_path / "oblique.nii.gz")
    with pytest.warns(GeometryWarning, match=r"sheared \(array axes 11\.3 degrees"):
        vio.load(tmp_path / "sheared.nii.gz")


def test_gzip_output_is_deterministic_and_standard(nib_data, tmp_path):
    vol = vio.load(nib_data("anatomical.nii"))
    img = vio.derived_image(vol.data, vol)
    vio.save(img, tmp_path / "a.nii.gz")
    vio.save(img, tmp_path / "b.nii.gz")
    a = (tmp_path / "a.nii.gz").read_bytes()
    assert a == (tmp_path / "b.nii.gz").read_bytes()
    assert a[4:8] == b"\0\0\0\0"  # no timestamp
    assert not a[3] & 0x08  # no file name stored
    # Any standard gzip reader gets the same NIfTI bytes back.
    nii = gzip.decompress(a)
    assert nib.Nifti1Image.from_bytes(nii).get_fdata().sum() == pytest.approx(float(vol.data.sum()), rel=1e-6)


def test_gzip_bytes_do_not_depend_on_thread_count(nib_data, tmp_path, monkeypatch):
    vol = vio.load(nib_data("example4d.nii.gz"))  # 2.4 MB as float32: three gzip blocks
    img = vio.derived_image(vol.data, vol)
    out = []
    for n in (1, 2, 5):
        monkeypatch.setattr(vio, "GZIP_THREADS", n)
        vio.save(img, tmp_path / f"t{n}.nii.gz")
        out.append((tmp_path / f"t{n}.nii.gz").read_bytes())
    assert out[0] == out[1] == out[2]


def test_gzip_bytes_do_not_depend_on_how_the_writes_are_cut(tmp_path, rng):
    """Blocks are deflated on their own, counted from the file start: the stream must cut them there."""
    payload = np.round(rng.normal(100, 10, 3_500_000)).astype(np.float32).tobytes()  # 14 MB, 14 blocks
    files = []
    for name, cuts in [("one", [len(payload)]), ("small", [348, 4, 100_000]), ("odd", [1, 3 << 20, 777_777])]:
        path = tmp_path / f"{name}.gz"
        with open(path, "wb") as fh:
            stream = vio._GzipStream(fh)
            pos, i = 0, 0
            while pos < len(payload):
                n = cuts[i % len(cuts)]
                assert stream.write(payload[pos : pos + n]) == len(payload[pos : pos + n])
                pos, i = pos + n, i + 1
                assert stream.tell() == min(pos, len(payload))
            stream.close()
        files.append(path.read_bytes())
        assert gzip.decompress(files[-1]) == payload  # any gzip reader
    for other in (1, 2):  # the files stay in tmp_path; the message says whether the data differ too
        assert files[other] == files[0], why_gzip_differs(files[0], files[other])


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this platform")
def test_gzip_threads_follow_the_cpus_the_process_may_use(tmp_path, monkeypatch):
    """A SLURM job or taskset limits the affinity mask; os.cpu_count() would count the whole node."""
    monkeypatch.setattr(vio, "GZIP_THREADS", 0)
    for cpus, workers in (({3}, None), ({0, 2, 5}, 3)):
        monkeypatch.setattr(vio.os, "sched_getaffinity", lambda pid, cpus=cpus: cpus)
        assert vio.usable_cpus() == len(cpus)
        with open(tmp_path / "x.gz", "wb") as fh:
            stream = vio._GzipStream(fh)
            pool = stream._gz._pool
            assert (pool and pool._max_workers) == workers
            stream.close()
        assert gzip.decompress((tmp_path / "x.gz").read_bytes()) == b""


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gzip_stream_reads_a_buffer_only_before_write_returns(tmp_path, rng, monkeypatch, threads):
    """Most blocks of a large buffer are deflated from the caller's memory, without a copy; the
    caller may overwrite the buffer as soon as write() returns, whatever the thread count."""
    monkeypatch.setattr(vio, "GZIP_THREADS", threads)
    buffer = np.round(rng.normal(100, 10, 3 << 20)).astype(np.float32)  # 12 MiB: 12 blocks
    handed = []
    with open(tmp_path / "x.gz", "wb") as fh:
        stream = vio._GzipStream(fh)
        stream.write(b"\1" * 352)  # a header first: the blocks do not start at the buffer's start
        for fill in (None, 7.0, np.nan):
            handed.append(buffer.tobytes())
            stream.write(memoryview(buffer).cast("B"))
            buffer[...] = fill if fill is not None else 0.0  # overwritten before the blocks are all deflated
        stream.close()
    expected = b"\1" * 352 + b"".join(handed)
    assert gzip.decompress((tmp_path / "x.gz").read_bytes()) == expected
    with open(tmp_path / "bytes.gz", "wb") as fh:  # the same bytes handed over as immutable bytes
        stream = vio._GzipStream(fh)
        stream.write(expected)
        stream.close()
    assert (tmp_path / "bytes.gz").read_bytes() == (tmp_path / "x.gz").read_bytes()


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_save_writes_the_bytes_nibabel_writes(tmp_path, nib_data, ext):
    """save() writes float32 images from their array's memory: the file must hold exactly what
    nibabel's own writer makes of the image (3-D, 4-D, NIfTI-2, C order, a header extension)."""
    anat, series = vio.load(nib_data("anatomical.nii")), vio.load(nib_data("example4d.nii.gz"))
    images = [vio.derived_image(anat.data, anat), vio.derived_image(series.data, series)]
    images.append(vio.derived_image(np.ascontiguousarray(anat.data), anat))  # C order: converted on the way
    nifti2 = nib.Nifti2Image(anat.data, anat.affine)
    images.append(vio.derived_image(anat.data, nifti2))
    with_extension = vio.derived_image(anat.data, anat)
    with_extension.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"volfilter test"))
    images.append(with_extension)
    moved = vio.derived_image(anat.data, anat)
    moved.affine[:3, 3] += 5.0  # nibabel brings the header up to date with the affine when it writes
    images.append(moved)
    for n, img in enumerate(images):
        assert vio._plain_float32(img) is not None
        vio.save(img, tmp_path / f"{n}{ext}")
        written = (tmp_path / f"{n}{ext}").read_bytes()
        assert (gzip.decompress(written) if ext == ".nii.gz" else written) == img.to_bytes(), n
    assert nib.load(tmp_path / f"4{ext}").header.extensions[0].get_content() == b"volfilter test"


@pytest.mark.parametrize("threads", [1, 2])
def test_stream_writer_owns_what_it_was_handed(tmp_path, rng, monkeypatch, threads):
    """The GPU path reuses one download buffer for every result: blocks deflated after write()
    returns must be the bytes handed over, not what the caller put in its buffer since."""
    monkeypatch.setattr(vio, "GZIP_THREADS", threads)
    ref = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    buffer = np.asfortranarray(rng.normal(size=(128, 128, 80)).astype(np.float32))  # 5 MiB: 5 blocks
    volumes = [buffer.copy(order="F")]
    path = tmp_path / "series.nii.gz"
    with vio.NiftiStreamWriter(path, ref, (*buffer.shape, 2), "test") as writer:
        writer.write(buffer)
        buffer[...] = 7.0  # the next result lands in the same buffer before the blocks are deflated
        volumes.append(buffer.copy(order="F"))
        writer.write(buffer)
        buffer[...] = np.nan
    assert_array_equal(np.asarray(nib.load(path).dataobj), np.stack(volumes, axis=-1))


def test_isal_always_deflates_with_a_dictionary(tmp_path, rng, monkeypatch):
    """Without a dictionary, ISA-L's level-1 deflate encodes a stream's start by where its
    compressor lies in memory (README, "Failure behaviour"): the writer stores each stream's first
    16 bytes and primes ISA-L with them, so every block it hands ISA-L comes with a dictionary."""
    if vio._deflate is None or vio._private_compressor() is None:
        pytest.skip("isal's _ParallelCompress is not available")
    calls = []
    real = vio._deflate._ParallelCompress

    class Recording:
        def __init__(self, *args, **kwargs):
            self._compressor = real(*args, **kwargs)

        def compress_and_crc(self, data, zdict):
            calls.append((len(data), len(zdict)))
            return self._compressor.compress_and_crc(data, zdict)

    monkeypatch.setattr(vio._deflate, "_ParallelCompress", Recording)
    data = rng.normal(size=(64, 64, 96)).astype(np.float32)  # 1.5 MiB: two blocks
    path = tmp_path / "x.nii.gz"
    vio.save(nib.Nifti1Image(data, np.eye(4)), path)
    blocks = [c for c in calls if c != (len(b"volfilter"), 2)]  # without each compressor's own check
    assert len(blocks) == 2 and all(zdict_len > 0 for _, zdict_len in blocks), calls
    raw = path.read_bytes()
    nifti = gzip.decompress(raw)
    assert raw[10:15] == b"\x00\x10\x00\xef\xff" and raw[15:31] == nifti[:16]  # stored: LEN 16, NLEN
    assert_array_equal(nib.load(path).get_fdata(dtype=np.float32), data)


_WRITE_IN_A_FRESH_PROCESS = """
import hashlib, sys
import numpy as np, nibabel as nib
from pipeline import io as vio
i, j, k = np.meshgrid(np.arange(12), np.arange(12), np.arange(12), indexing="ij")
ball = np.where((i - 6) ** 2 + (j - 6) ** 2 + (k - 6) ** 2 < 20, 100.0 + i + j, 0.0).astype(np.float32)
vio.GZIP_THREADS = 1
vio.save(nib.Nifti1Image(ball, np.eye(4)), sys.argv[1])
nifti = nib.Nifti1Image(ball, np.eye(4)).to_bytes()
compressor = vio._deflate._ParallelCompress(buffersize=1 << 20, level=vio.GZIP_LEVEL)
print(hashlib.sha256(compressor.compress_and_crc(nifti, b"")[0]).hexdigest())
"""


def test_gzip_bytes_do_not_depend_on_where_isal_allocates(tmp_path):
    """With isal's compressor placed where ISA-L's level-1 deflate encodes a stream that starts
    without a dictionary otherwise (README, "Failure behaviour"; tests/isal_window_shim.c places
    it), an unprimed deflate in that process differs from one in a normal process, and the file
    the writer makes is the same in both."""
    if sys.platform != "linux" or vio._deflate is None or vio._private_compressor() is None:
        pytest.skip("needs Linux and isal's _ParallelCompress")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the allocation shim")
    shim = tmp_path / "shim.so"
    built = subprocess.run([compiler, "-O2", "-shared", "-fPIC", str(TESTS / "isal_window_shim.c"), "-o", str(shim)],
                           capture_output=True, text=True)  # fmt: skip
    if built.returncode != 0:
        pytest.skip(f"the shim does not build here: {built.stderr.strip()[:200]}")

    def write(name, preload=None):
        env = {**os.environ, "PYTHONPATH": str(TESTS.parent)} | ({"LD_PRELOAD": str(shim)} if preload else {})
        out = subprocess.run([sys.executable, "-c", _WRITE_IN_A_FRESH_PROCESS, str(tmp_path / name)], env=env,
                             capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout.strip()  # the unprimed deflate's digest

    usual = write("usual.nii.gz")
    try:
        placed = write("placed.nii.gz", preload=True)
    except subprocess.CalledProcessError as exc:  # a C library without __libc_malloc (musl), say
        pytest.skip(f"the shim does not load here: {exc.stderr.strip()[-200:]}")
    if placed == usual:  # the shim did not place the compressor (another isal), or ISA-L is fixed
        pytest.skip("an unprimed deflate is the same in the shimmed process: nothing to check against")
    assert_same_bytes(tmp_path / "placed.nii.gz", tmp_path / "usual.nii.gz")


def test_gzip_header_follows_rfc1952(nib_data, tmp_path):
    vol = vio.load(nib_data("anatomical.nii"))
    vio.save(vio.derived_image(vol.data, vol), tmp_path / "a.nii.gz")
    head = (tmp_path / "a.nii.gz").read_bytes()[:10]
    assert head[:4] == b"\x1f\x8b\x08\x00"  # gzip, deflate, no flags (no name, no comment)
    assert head[8] == 0 and head[9] == 255  # XFL, then OS "unknown" (ISA-L's writer swaps the two)


def test_gzip_without_isal_private_compressor_gives_same_data(nib_data, tmp_path, monkeypatch):
    """The public compressobj path stands in where isal lacks _ParallelCompress: same NIfTI bytes."""
    vol = vio.load(nib_data("example4d.nii.gz"))  # 2.4 MB as float32: three gzip blocks
    img = vio.derived_image(vol.data, vol)
    vio.save(img, tmp_path / "private.nii.gz")
    monkeypatch.delattr(vio._deflate, "_ParallelCompress")
    for n in (1, 3):
        monkeypatch.setattr(vio, "GZIP_THREADS", n)
        vio.save(img, tmp_path / f"public{n}.nii.gz")
    public = [(tmp_path / f"public{n}.nii.gz").read_bytes() for n in (1, 3)]
    assert public[0] == public[1]
    assert gzip.decompress(public[0]) == gzip.decompress((tmp_path / "private.nii.gz").read_bytes())


def test_gzip_worker_failure_propagates_and_ends_the_workers(nib_data, tmp_path, monkeypatch):
    import threading

    vol = vio.load(nib_data("example4d.nii.gz"))
    img = vio.derived_image(vol.data, vol)
    calls = []

    def failing_deflater():
        def deflate(data, window):
            calls.append(len(data))
            if len(calls) == 2:
                raise RuntimeError("deflate failed")
            return b"", 0, len(data)

        return deflate

    monkeypatch.setattr(vio, "GZIP_THREADS", 2)
    monkeypatch.setattr(vio, "_block_deflater", failing_deflater)
    with pytest.raises(RuntimeError, match="deflate failed"):
        vio.save(img, tmp_path / "out.nii.gz")
    assert os.listdir(tmp_path) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("volfilter-gzip")]


def _images_both_save_paths(vol):
    """An image save() writes from its array (float32, as derived_image makes it) and one it hands
    to nibabel (int16)."""
    plain = vio.derived_image(vol.data, vol)
    other = nib.Nifti1Image(np.round(vol.data).astype(np.int16), vol.affine)
    assert vio._plain_float32(plain) is not None and vio._plain_float32(other) is None
    return [plain, other]


def _failing_gzip_write(*args, **kwargs):
    raise RuntimeError("disk on fire")


@pytest.mark.parametrize("which", [0, 1], ids=["from-array", "via-nibabel"])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, nib_data, which):
    img = _images_both_save_paths(vio.load(nib_data("anatomical.nii")))[which]
    target = tmp_path / "out.nii.gz"
    monkeypatch.setattr(vio._GzipStream, "write", _failing_gzip_write)
    with pytest.raises(RuntimeError, match="disk on fire"):
        vio.save(img, target)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("which", [0, 1], ids=["from-array", "via-nibabel"])
def test_failed_write_keeps_previous_complete_file(tmp_path, monkeypatch, nib_data, which):
    img = _images_both_save_paths(vio.load(nib_data("anatomical.nii")))[which]
    target = tmp_path / "out.nii.gz"
    vio.save(img, target)
    before = target.read_bytes()
    monkeypatch.setattr(vio._GzipStream, "write", _failing_gzip_write)
    with pytest.raises(RuntimeError, match="disk on fire"):
        vio.save(img, target)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["out.nii.gz"]


# ---------------------------------------------------------------- refusals


def _header_only(tmp_path, shape, name="huge.nii", dtype=np.float32):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_zooms((1.0,) * len(shape))
    path = tmp_path / name
    with open(path, "wb") as fh:
        hdr.write_to(fh)
        fh.write(b"\0" * 4)
    return path


def test_huge_header_refused_from_header_alone(tmp_path):
    path = _header_only(tmp_path, (30000, 30000, 30000))
    # The file holds no data: refusing on memory (not truncation) proves nothing was allocated or read.
    with pytest.raises(VolfilterError, match="GiB"):
        vio.load(path)


def test_truncated_uncompressed_refused(tmp_path):
    path = _header_only(tmp_path, (10, 10, 10))
    with pytest.raises(VolfilterError, match="truncated"):
        vio.load(path)


def test_truncated_gz_refused(nib_data, tmp_path):
    data = pathlib.Path(nib_data("example4d.nii.gz")).read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolfilterError, match="truncated|corrupt"):
        vio.load(path)


def _as_members(data: bytes, cuts) -> bytes:
    """``data`` as a gzip file of several members, cut at ``cuts`` (what bgzip, or .gz files joined
    end to end, give); its trailer's ISIZE is then the last member's length only."""
    edges = [0, *cuts, len(data)]
    return b"".join(gzip.compress(data[a:b], mtime=0) for a, b in itertools.pairwise(edges))


def test_gzip_of_several_members_is_read_whole(nib_data, tmp_path):
    src = nib_data("example4d.nii.gz")
    data = gzip.decompress(pathlib.Path(src).read_bytes())
    path = tmp_path / "members.nii.gz"
    path.write_bytes(_as_members(data, [100, 352 + 5000, len(data) - 20]))  # in the header, the data, near the end
    assert int.from_bytes(path.read_bytes()[-4:], "little") == 20  # the trailer names the last member only
    assert vio.read_header(path).shape == nib.load(src).shape
    assert_array_equal(vio.load(path).data, nib.load(src).get_fdata(dtype=np.float32))


def test_gzip_of_several_members_cut_short_refused(nib_data, tmp_path):
    data = gzip.decompress(pathlib.Path(nib_data("example4d.nii.gz")).read_bytes())
    whole = _as_members(data, [4096, len(data) // 2])
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(whole[: len(whole) * 3 // 4])  # inside the last member
    with pytest.raises(VolfilterError, match="truncated"):
        vio.load(cut)
    short = tmp_path / "short.nii.gz"  # complete members, but the data stop halfway
    short.write_bytes(_as_members(data[: len(data) // 2], [4096]))
    with pytest.raises(VolfilterError, match="truncated"):
        vio.load(short)
    single = tmp_path / "single.nii.gz"  # one complete member: its trailer refuses it from the header alone
    single.write_bytes(gzip.compress(data[: len(data) // 2], mtime=0))
    with pytest.raises(VolfilterError, match=f"records {len(data) // 2}"):
        vio.read_header(single)


@pytest.mark.parametrize(
    "content,name,fragment",
    [
        (b"", "empty.nii", "empty"),
        (os.urandom(4096), "noise.nii.gz", "not gzip"),
        (gzip.compress(os.urandom(4096)), "noise2.nii.gz", "not a NIfTI"),
        (b"hello world, not an image" * 20, "text.nii", "not a NIfTI"),
    ],
)
def test_not_nifti_refused(tmp_path, content, name, fragment):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(VolfilterError, match=fragment):
        vio.load(path)


def test_uncompressed_named_gz_refused(nib_data, tmp_path):
    path = tmp_path / "plain.nii.gz"
    path.write_bytes(pathlib.Path(nib_data("anatomical.nii")).read_bytes())
    with pytest.raises(VolfilterError, match="not gzip-compressed"):
        vio.load(path)


@pytest.mark.parametrize("shape,fragment", [((10, 10), "2-D"), ((4, 4, 4, 2, 2), "5-D"), ((4, 0, 4), "empty")])
def test_dimensionality_refused(tmp_path, shape, fragment):
    img = nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4))
    path = tmp_path / "x.nii"
    img.to_filename(path)
    with pytest.raises(VolfilterError, match=fragment):
        vio.load(path)


def test_trailing_singleton_dims_are_accepted(tmp_path):
    img = nib.Nifti1Image(np.ones((4, 4, 4, 1, 1), np.float32), np.eye(4))
    img.to_filename(tmp_path / "x.nii")
    assert vio.load(tmp_path / "x.nii").data.shape == (4, 4, 4, 1)


@pytest.mark.parametrize("zooms", [(1.0, 0.0, 1.0), (1.0, -2.0, 1.0)])
def test_zero_or_negative_voxel_size_refused(tmp_path, zooms):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4, 4, 4))
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(np.eye(4), code=0)
    hdr.set_sform(np.eye(4), code=0)
    hdr["pixdim"][1:4] = zooms
    path = tmp_path / "z.nii"
    with open(path, "wb") as fh:
        hdr.write_to(fh)
        fh.write(np.zeros(64, np.float32).tobytes())
    with pytest.raises(VolfilterError, match="voxel sizes"):
        vio.load(path)


def test_mask_shape_and_orientation_checked(tmp_path, write_nifti):
    ref = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4))
    with pytest.raises(VolfilterError, match="shape"):
        vio.load_mask(write_nifti(np.ones((4, 5, 7), np.uint8), "m1.nii"), ref)
    with pytest.raises(VolfilterError, match="affine"):
        vio.load_mask(write_nifti(np.ones((4, 5, 6), np.uint8), "m2.nii", affine=np.diag([-1, 1, 1, 1])), ref)


def test_mask_geometry_compared_in_mm_across_units(tmp_path, write_nifti):
    ref = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([2.0, 2.0, 2.0, 1]))
    ref.header.set_xyzt_units("mm")
    same = np.diag([0.002, 0.002, 0.002, 1])  # the same grid, in metres (xyzt_units 1)
    assert vio.load_mask(write_nifti(np.ones((4, 5, 6), np.uint8), "m.nii", affine=same, xyzt_units=1), ref).all()
    shifted = same.copy()
    shifted[0, 3] = 0.0005  # half a millimetre: far below 1e-3 in metres, far above it in mm
    with pytest.raises(VolfilterError, match="affine"):
        vio.load_mask(write_nifti(np.ones((4, 5, 6), np.uint8), "m3.nii", affine=shifted, xyzt_units=1), ref)


def test_filter_image_accepts_image_and_path(nib_data):
    a = filter_image(nib_data("anatomical.nii"), "gaussian", fwhm_mm=4, backend="cpu")
    b = filter_image(nib.load(nib_data("anatomical.nii")), "gaussian", fwhm_mm=4, backend="cpu")
    assert_allclose(a.get_fdata(), b.get_fdata())
    assert a.header.get_data_dtype() == np.float32
    assert_allclose(a.affine, nib.load(nib_data("anatomical.nii")).affine)


@pytest.mark.parametrize("name", ["example4d.nii.gz", "anatomical.nii", "synthetic 3-D, 4 gzip blocks"])
@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_streamed_output_is_byte_identical_to_whole_volume_save(nib_data, tmp_path, rng, name, ext):
    from pipeline import apply_filter
    from pipeline.image import FilterJob, filter_file

    if name.startswith("synthetic"):
        src = str(tmp_path / "synthetic.nii.gz")
        nib.save(nib.Nifti1Image(rng.normal(100, 10, (96, 96, 100)).astype(np.float32), np.eye(4)), src)
    else:
        src = nib_data(name)
    streamed = tmp_path / ("streamed" + ext)
    filter_file(src, [FilterJob("gaussian", {"fwhm_mm": 5}, str(streamed))], backend="cpu", sidecars=False)
    vol = vio.load(src)
    whole = tmp_path / ("whole" + ext)
    out = apply_filter(vol.data, vol.voxel_mm, "gaussian", fwhm_mm=5)
    vio.save(vio.derived_image(out, vol, "volfilter gaussian"), whole)
    assert streamed.read_bytes() == whole.read_bytes()


def test_series_is_streamed_volume_by_volume(tmp_path, rng):
    """Peak memory does not grow with the number of volumes (imports and gzip buffers aside)."""
    import tracemalloc

    from pipeline.image import FilterJob, filter_file

    def peak_for(n_volumes):
        src = tmp_path / f"bold{n_volumes}.nii.gz"
        nib.save(nib.Nifti1Image(rng.normal(100, 10, (48, 48, 32, n_volumes)).astype(np.float32), np.eye(4)), src)
        jobs = [
            FilterJob("gaussian", {"fwhm_mm": 4}, str(tmp_path / "a.nii.gz")),
            FilterJob("sobel", {}, str(tmp_path / "b.nii.gz")),
        ]
        tracemalloc.start()
        filter_file(src, jobs, backend="cpu", sidecars=False)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    peak_for(2)  # warm-up: lazy imports allocate too
    small, large = peak_for(20), peak_for(160)  # 5.6 MB vs 45 MB of float32 data
    assert large < small + 8 * 2**20, f"{small / 2**20:.1f} MB for 20 volumes, {large / 2**20:.1f} MB for 160"
    assert nib.load(tmp_path / "b.nii.gz").shape == (48, 48, 32, 160)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_load_holds_the_volume_once(tmp_path, rng, ext):
    """Loading a float32 volume allocates its array and little more: the gzip readers decompress
    a whole ``readinto`` request into a temporary copy, so asking for all 8 MB at once cost 8 MB more."""
    import tracemalloc

    src = tmp_path / ("big" + ext)
    data = rng.normal(100, 10, (128, 128, 128)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), src)
    vio.load(src)  # warm-up: lazy imports allocate too
    tracemalloc.start()
    vol = vio.load(src)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert_array_equal(vol.data, data)
    assert peak < data.nbytes + 4 * 2**20, f"peak {peak / 2**20:.1f} MB for {data.nbytes / 2**20:.0f} MB of data"


def test_fsync_is_opt_in(tmp_path, monkeypatch):
    """VOLFILTER_FSYNC=1 (io.FSYNC) forces each output to disk before the rename; off by default."""
    import pipeline.io as vio

    calls = []
    monkeypatch.setattr(vio.os, "fsync", lambda fd: calls.append(fd))
    img = vio.derived_image(np.ones((4, 5, 6), np.float32), nib.Nifti1Image(np.zeros((4, 5, 6)), np.eye(4)))
    monkeypatch.setattr(vio, "FSYNC", False)
    vio.save(img, tmp_path / "a.nii.gz")
    assert calls == []
    monkeypatch.setattr(vio, "FSYNC", True)
    vio.save(img, tmp_path / "b.nii.gz")
    assert len(calls) == 1
    assert np.array_equal(nib.load(tmp_path / "b.nii.gz").get_fdata(), np.ones((4, 5, 6)))
