"""The NIfTI contract: careful reading, honest headers, atomic writes.

Reading checks the header against the file and against available memory
before any data is allocated, then returns a float32 working copy with the
file's scaling applied. Writing produces float32 output whose header keeps
the input's geometry (affine, qform and sform with their codes, zooms with
the TR, units, intent, NIfTI version) and resets the scaling to slope 1,
intercept 0. Writes go to a temporary file in the destination folder and are
renamed into place, so a failure or a kill never leaves a partial output.

``.nii.gz`` goes through ISA-L (``isal``) when it is installed: several times
faster than zlib and still a standard, deterministic gzip stream (no name, no
timestamp in the gzip header).

Examples
--------
>>> import numpy as np, nibabel as nib, tempfile, os
>>> src = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.diag([2, 2, 3, 1]))
>>> with tempfile.TemporaryDirectory() as d:
...     nib.save(src, os.path.join(d, "in.nii"))
...     vol = load(os.path.join(d, "in.nii"))
...     save(derived_image(vol.data * 2, vol), os.path.join(d, "out.nii.gz"))
...     out = nib.load(os.path.join(d, "out.nii.gz"))
...     print(vol.data.dtype, vol.voxel_mm, out.get_data_dtype(), float(out.get_fdata()[1, 2, 3]))
float32 (2.0, 2.0, 3.0) float32 46.0
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import io
import os
import struct
import tempfile
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel.fileholders import FileHolder

from .backend import has_finite
from .errors import GeometryWarning, VolfilterError

try:  # optional: ISA-L gzip, measured several times faster than zlib (bench/)
    from isal import igzip as _gzip_impl
    from isal import isal_zlib as _deflate

    GZIP_BACKEND = "isal"
except ImportError:  # pragma: no cover - exercised only without isal
    _gzip_impl = gzip
    _deflate = None
    GZIP_BACKEND = "zlib"

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
# Input float copy + output float copy + a few per-volume temporaries.
WORKING_COPIES = 2
VOLUME_TEMPORARIES = 5
GZIP_LEVEL = 1  # nibabel's default level too: float data barely compresses further


@dataclass
class Volume:
    """A loaded NIfTI volume: the file's header exactly as read, its affine, float32 data."""

    header: nib.Nifti1Header
    affine: np.ndarray
    data: np.ndarray
    path: str

    @property
    def voxel_mm(self) -> tuple[float, float, float]:
        return voxel_sizes_mm(self)


# The header's spatial unit (xyzt_units), in mm. NIfTI puts pixdim and the qform/sform in this
# unit; "unknown" is taken as mm, as nibabel, FSL and SPM do.
MM_PER_UNIT = {"mm": 1.0, "unknown": 1.0, "meter": 1000.0, "micron": 0.001}


def voxel_sizes_mm(img) -> tuple[float, float, float]:
    """Voxel sizes in mm along the three array axes, from the image's affine.

    The affine's column norms are the physical step along each array axis, also
    for oblique images and for sform-only headers whose pixdim disagree; a header
    whose spatial unit is metres or microns is converted to mm.
    """
    return tuple(float(s) for s in nib.affines.voxel_sizes(_affine_mm(img))[:3])


def _affine_mm(img) -> np.ndarray:
    """The affine with its spatial part in mm (see :data:`MM_PER_UNIT`)."""
    scaled = np.array(img.affine, dtype=np.float64)
    scaled[:3] *= MM_PER_UNIT.get(img.header.get_xyzt_units()[0], 1.0)
    return scaled


SHEAR_TOLERANCE_DEG = 0.1  # a float32 sform of an orthogonal grid is off by ~1e-5 degrees


def shear_degrees(affine) -> float:
    """How far the array axes are from orthogonal in world space: the largest |90° - angle| of a pair."""
    cols = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit = cols / np.linalg.norm(cols, axis=0)
    cosines = [abs(float(unit[:, a] @ unit[:, b])) for a, b in ((0, 1), (0, 2), (1, 2))]
    return float(np.degrees(np.arcsin(min(1.0, max(cosines)))))


def nifti_extension(path: str) -> str:
    """``.nii.gz`` or ``.nii``; anything else is a :class:`VolfilterError`."""
    name = os.fspath(path).lower()
    for ext in NIFTI_EXTENSIONS:
        if name.endswith(ext):
            return ext
    raise VolfilterError(f"{path}: file name must end in .nii or .nii.gz")


def available_memory_bytes() -> int:
    """Memory the process can still allocate: MemAvailable on Linux, else physical RAM."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 1 << 62


def working_bytes(shape) -> int:
    """Bytes a filter job needs for a volume of ``shape`` (float32 copies)."""
    n_total = int(np.prod(shape, dtype=np.int64))
    n_vol = int(np.prod(shape[:3], dtype=np.int64))
    return 4 * (WORKING_COPIES * n_total + VOLUME_TEMPORARIES * n_vol)


@contextlib.contextmanager
def _open_raw(path: str):
    """Open ``path`` for reading, decompressing ``.gz`` on the fly."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    is_gz = magic == b"\x1f\x8b"
    named_gz = path.lower().endswith(".gz")
    if named_gz and not is_gz:
        raise VolfilterError(f"{path}: named .gz but not gzip-compressed; rename it to end in .nii")
    if is_gz and not named_gz:
        raise VolfilterError(f"{path}: gzip-compressed but not named .gz; rename it to end in .nii.gz")
    fh = _gzip_impl.open(path, "rb") if is_gz else open(path, "rb")
    try:
        yield fh, is_gz
    finally:
        fh.close()


def _image_class(first_bytes: bytes, path: str):
    if len(first_bytes) < 4:
        raise VolfilterError(f"{path}: too short to be a NIfTI file ({len(first_bytes)} bytes)")
    for endian in "<>":
        (sizeof_hdr,) = struct.unpack(endian + "i", first_bytes[:4])
        if sizeof_hdr == 348:
            return nib.Nifti1Image
        if sizeof_hdr == 540:
            return nib.Nifti2Image
    raise VolfilterError(f"{path}: not a NIfTI-1 or NIfTI-2 file (no valid header size)")


def _check_header(img, path: str, file_size: int, is_gz: bool, gz_isize: int | None, stored_pixdim):
    hdr = img.header
    shape = shape_of(img)
    if len(shape) < 3:
        raise VolfilterError(f"{path}: {len(shape)}-D image {shape}; volfilter needs a 3-D volume or a 4-D series")
    if len(shape) > 4:
        raise VolfilterError(f"{path}: {len(shape)}-D image {shape}; only 3-D volumes and 4-D series are supported")
    if min(shape) < 1:
        raise VolfilterError(f"{path}: header declares an empty image of shape {shape}")
    zooms = [float(z) for z in stored_pixdim]
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        raise VolfilterError(f"{path}: voxel sizes (pixdim[1:4]) {tuple(zooms)} must be positive; fix the header")
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolfilterError(f"{path}: the affine is singular or not finite; fix the qform/sform")
    shear = shear_degrees(affine)
    if shear > SHEAR_TOLERANCE_DEG:
        warnings.warn(
            f"{path}: the affine is sheared (array axes {shear:.1f} degrees from orthogonal); filters run along "
            f"the array axes with voxel sizes {tuple(round(v, 3) for v in voxel_sizes_mm(img))} mm, so a "
            "Gaussian's FWHM holds along each axis but the kernel is not isotropic in world space",
            GeometryWarning,
            stacklevel=2,
        )
    dtype = hdr.get_data_dtype()
    if dtype.kind not in "iuf" or dtype.fields is not None:
        raise VolfilterError(f"{path}: data type {dtype} is not supported (integer or real float data only)")
    n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    offset = int(hdr.get_data_offset())
    need = working_bytes(shape)
    avail = available_memory_bytes()
    if need > avail:
        raise VolfilterError(
            f"{path}: header declares {shape} voxels, which needs {need / 2**30:.1f} GiB to filter "
            f"but {avail / 2**30:.1f} GiB is available; check the header or use a larger machine"
        )
    if not is_gz and file_size < offset + n_bytes:
        raise VolfilterError(
            f"{path}: truncated: header declares {offset + n_bytes} bytes of header and data, "
            f"the file holds {file_size}"
        )
    if (
        is_gz
        and gz_isize is not None
        and offset + n_bytes < 2**32
        and gz_isize < offset + n_bytes
        and _ends_with_first_member(path)
    ):
        # ISIZE is the uncompressed size mod 2**32 of the last gzip member, here the only one. A file
        # of several members (bgzip's, or .gz files joined end to end) is checked as it is read.
        raise VolfilterError(
            f"{path}: truncated or header claims too much data: it declares {offset + n_bytes} "
            f"uncompressed bytes, the gzip stream records {gz_isize}"
        )
    return shape


def _ends_with_first_member(path: str) -> bool:
    """Whether the gzip file ``path`` holds one member, so that its trailer describes all of it.
    Decompresses the first member only (a few KB in bgzip's files); a first member cut short
    raises as it would on reading."""
    inflate = _deflate.decompressobj(31) if _deflate is not None else zlib.decompressobj(31)
    with open(path, "rb") as fh:
        while not inflate.eof:
            chunk = fh.read(READ_STEP)
            if not chunk:
                raise EOFError("compressed file ended before the end-of-stream marker was reached")
            inflate.decompress(chunk, READ_STEP)
            while inflate.unconsumed_tail and not inflate.eof:  # bounded output: nothing is kept
                inflate.decompress(inflate.unconsumed_tail, READ_STEP)
        return not (inflate.unused_data or fh.read(1))


def read_header(path) -> nib.Nifti1Image:
    """Read and check the header of ``path`` without touching the data.

    Returns an image whose data is still a proxy. Raises
    :class:`VolfilterError` for anything a user can fix: missing, empty,
    mis-named or non-NIfTI files, 2-D or 5-D images, bad voxel sizes, a
    singular affine, a data size that the file cannot hold, or a volume that
    would not fit in memory.
    """
    img, _ = _open_checked(os.fspath(path), lambda img, fh: None)
    return img


def _open_checked(path: str, with_image):
    nifti_extension(path)
    if not os.path.exists(path):
        raise VolfilterError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise VolfilterError(f"{path}: not a regular file")
    file_size = os.path.getsize(path)
    if file_size == 0:
        raise VolfilterError(f"{path}: empty file")
    gz_isize = None
    try:
        with _open_raw(path) as (fh, is_gz):
            if is_gz:
                with open(path, "rb") as raw:
                    raw.seek(-4, os.SEEK_END)
                    (gz_isize,) = struct.unpack("<I", raw.read(4))
            first = fh.read(4)
            fh.seek(0)
            klass = _image_class(first, path)
            # nibabel silently "fixes" zero or negative pixdim on load; look at the stored values.
            stored_pixdim = klass.header_class.from_fileobj(fh, check=False)["pixdim"][1:4].copy()
            fh.seek(0)
            img = klass.from_file_map({"header": FileHolder(path, fh), "image": FileHolder(path, fh)})
            shape = _check_header(img, path, file_size, is_gz, gz_isize, stored_pixdim)
            with_image(img, fh)
    except VolfilterError:
        raise
    except (OSError, EOFError, zlib.error, ValueError, struct.error, nib.filebasedimages.ImageFileError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VolfilterError(f"{path}: cannot read NIfTI data, the file is truncated or corrupt ({reason})") from None
    return img, shape


READ_STEP = 1 << 20  # bytes asked of the decompressor per call (see _read_exact)


def _read_exact(fh, n: int) -> np.ndarray:
    """Read up to ``n`` bytes into one uninitialised buffer (no zero fill, no intermediate copies).

    Shorter only at end of file. The buffer is filled READ_STEP bytes at a time: Python's gzip
    readers (stdlib and isal) answer ``readinto`` by decompressing the whole request into a new
    bytes object and copying it over, so one call for a 64 MB volume allocated, paged in and
    copied 64 MB more (a 64 MB ``.nii.gz`` load, 2-core VM, 9 alternated runs: 316 -> 278 ms).
    """
    buf = np.empty(n, np.uint8)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = fh.readinto(view[got : got + READ_STEP])
        if not k:
            break
        got += k
    view.release()
    return buf[:got]


def _read_to_end(fh) -> None:
    """Decompress what follows the data, so that the gzip reader checks the stream's CRC-32 and
    length: a damaged stored block decodes without error and is caught only there."""
    while fh.read(1 << 20):
        pass


def _read_volumes(proxy, fh, shape, path):
    """Yield the 3-D volumes of an open NIfTI stream as float32 (Fortran order), scaling applied.

    One reader for whole loads and for volume-by-volume streaming, so both give the same bits.
    """
    spatial = tuple(shape[:3])
    n_bytes = int(np.prod(spatial, dtype=np.int64)) * proxy.dtype.itemsize
    slope, inter = float(proxy.slope), float(proxy.inter)
    try:
        fh.seek(int(proxy.offset))
        n = n_volumes(shape)
        for t in range(n):
            buf = _read_exact(fh, n_bytes)
            if len(buf) < n_bytes:
                raise VolfilterError(f"{path}: truncated: volume {t} ends after {len(buf)} of {n_bytes} bytes")
            raw = buf.view(proxy.dtype).reshape(spatial, order="F")
            # Native float32 is used in place (the buffer is writable); anything else is converted.
            vol = raw if raw.dtype == np.dtype(np.float32) else raw.astype(np.float32)
            del buf, raw  # do not hold the raw bytes while the caller filters this volume
            if slope != 1.0:
                vol *= np.float32(slope)
            if inter != 0.0:
                vol += np.float32(inter)
            if t == n - 1 and not isinstance(fh, io.BufferedReader):
                _read_to_end(fh)  # before the last volume is used: a damaged input writes nothing
            yield vol
    except (OSError, EOFError, zlib.error) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VolfilterError(f"{path}: cannot read NIfTI data, the file is truncated or corrupt ({reason})") from None


def load(path) -> Volume:
    """Load a NIfTI-1/2 volume as float32 with its scaling applied.

    Parameters
    ----------
    path : str or PathLike
        ``.nii`` or ``.nii.gz``, any endianness.

    Returns
    -------
    Volume
        ``.header`` (as in the file), ``.affine``,
        ``.data`` (float32, Fortran-ordered as stored, 3-D or 4-D) and
        ``.voxel_mm``.
    """
    path = os.fspath(path)

    def read_all(img, fh):
        shape = shape_of(img)
        if len(shape) == 3:  # the volume as read: no copy
            return next(_read_volumes(img.dataobj, fh, shape, path))
        data = np.empty(shape, np.float32, order="F")
        flat = data.reshape(data.shape[:3] + (-1,), order="F")
        for t, vol in enumerate(_read_volumes(img.dataobj, fh, data.shape, path)):
            flat[..., t] = vol
        return data

    holder = {}

    def keep(img, fh):
        holder["data"] = read_all(img, fh)

    img, _ = _open_checked(path, keep)
    data = holder["data"]
    if not has_finite(data):
        raise VolfilterError(f"{path}: every voxel is NaN or infinite; there is nothing to filter")
    # Detach from the (closed) file: the header and affine are all we keep.
    return Volume(header=img.header.copy(), affine=img.affine.copy(), data=data, path=path)


def n_volumes(shape) -> int:
    """The 3-D volumes of an image of ``shape`` (:func:`shape_of`): its 4th dimension, or 1."""
    return shape[3] if len(shape) == 4 else 1


def shape_of(img) -> tuple[int, ...]:
    """The image's shape with trailing singleton dimensions beyond the 4th dropped."""
    shape = tuple(int(s) for s in img.header.get_data_shape())
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


@dataclass
class VolumeStream:
    """An open NIfTI file read one 3-D volume at a time (``volumes`` yields float32 arrays)."""

    header: nib.Nifti1Header
    affine: np.ndarray
    shape: tuple
    path: str
    volumes: object

    @property
    def voxel_mm(self) -> tuple[float, float, float]:
        return voxel_sizes_mm(self)


@contextlib.contextmanager
def open_volumes(path):
    """Check ``path`` like :func:`load`, then stream its volumes: memory for one volume, not the series."""
    path = os.fspath(path)
    img = read_header(path)
    shape = shape_of(img)
    with _open_raw(path) as (fh, _):
        yield VolumeStream(
            img.header.copy(), img.affine.copy(), shape, path, _read_volumes(img.dataobj, fh, shape, path)
        )


def load_mask(path, reference: nib.Nifti1Image) -> np.ndarray:
    """Load a mask aligned with ``reference``: True where non-zero and finite.

    ``reference`` is a :class:`Volume` or a nibabel image. The mask must have
    its spatial shape and affine (to 1e-3 mm, each in its header's unit);
    anything else is a :class:`VolfilterError`.
    """
    vol = load(path)
    data = vol.data
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    ref_shape = tuple(reference.header.get_data_shape()[:3])
    if data.ndim != 3 or data.shape != ref_shape:
        raise VolfilterError(f"mask {path}: shape {data.shape} does not match the image's {ref_shape}")
    if not np.allclose(_affine_mm(vol), _affine_mm(reference), atol=1e-3):
        raise VolfilterError(
            f"mask {path}: its affine (orientation/position) differs from the image's; resample the mask first"
        )
    return np.isfinite(data) & (data != 0)


_GEOMETRY_FIELDS = (
    "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
    "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "pixdim",
)  # fmt: skip


def derived_image(data: np.ndarray, reference, description: str = "volfilter"):
    """Wrap filtered ``data`` in a header that keeps ``reference``'s geometry.

    ``reference`` is a :class:`Volume`, :class:`VolumeStream` or a nibabel NIfTI image.
    The result is float32, of the reference's NIfTI version, with qform, sform
    and their codes, pixdim (zooms and TR), units, intent and slice timing
    unchanged, scaling reset to slope 1 / intercept 0 and cal_min/cal_max
    cleared (the old display range no longer applies).
    """
    ref_hdr = reference.header
    klass = nib.Nifti2Image if isinstance(ref_hdr, nib.Nifti2Header) else nib.Nifti1Image
    hdr = klass.header_class.from_header(ref_hdr) if not isinstance(ref_hdr, klass.header_class) else ref_hdr.copy()
    native = "<" if np.little_endian else ">"
    if hdr.endianness != native:
        hdr = hdr.as_byteswapped(native)
    hdr.set_data_dtype(np.float32)
    hdr.set_data_shape(data.shape)
    img = klass(data if data.dtype == np.float32 else np.asarray(data, dtype=np.float32), reference.affine, hdr)
    out = img.header
    for name in _GEOMETRY_FIELDS:
        out[name] = ref_hdr[name]
    out.set_slope_inter(1.0, 0.0)
    out["cal_min"] = 0
    out["cal_max"] = 0
    out["descrip"] = description[:79].encode("ascii", "replace")
    return img


def same_file(a, b) -> bool:
    """True when paths ``a`` and ``b`` name the same file (or would)."""
    a, b = os.fspath(a), os.fspath(b)
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


# The rename alone keeps a killed job from leaving a partial output; surviving a power cut or a
# node crash as well needs the data on disk before the rename (fsync), which measured 0.11 s per
# 50 MB .nii.gz on the 2-core test VM (a third of the write). nibabel does not fsync either, and
# Snakemake reruns the jobs of a crashed run, so fsync is opt-in: VOLFILTER_FSYNC=1.
FSYNC = os.environ.get("VOLFILTER_FSYNC", "") not in ("", "0")


class AtomicFile:
    """A temporary file beside ``path`` that becomes ``path`` on :meth:`commit` and vanishes on :meth:`abort`.

    A failure (or a kill) before the rename leaves no file at ``path``; a
    previous complete file there stays untouched until the new one is ready.
    Used as a context manager it commits on success and aborts on any exception.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self.folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(self.folder):
            raise VolfilterError(f"{self.path}: output folder {self.folder} does not exist")
        self.prefix = "." + os.path.basename(self.path) + "."
        try:
            fd, self.tmp = tempfile.mkstemp(prefix=self.prefix, suffix=TMP_SUFFIX, dir=self.folder)
        except OSError as exc:
            raise VolfilterError(f"{self.path}: cannot write in {self.folder} ({exc.strerror})") from None
        self.fh = os.fdopen(fd, "wb")

    def commit(self):
        try:
            self.fh.flush()
            if FSYNC:
                os.fsync(self.fh.fileno())
            self.fh.close()
            os.chmod(self.tmp, 0o644)
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.abort()
            raise VolfilterError(f"{self.path}: cannot write ({exc.strerror or exc})") from None
        _remove_stale_temporaries(self.folder, self.prefix)

    def abort(self):
        with contextlib.suppress(OSError):
            self.fh.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
            if isinstance(exc, OSError) and not isinstance(exc, VolfilterError):
                raise VolfilterError(f"{self.path}: cannot write ({exc.strerror or exc})") from None
        return False


def atomic_write(path, write):
    """Call ``write(fileobj)`` on an :class:`AtomicFile` for ``path``."""
    with AtomicFile(path) as f:
        write(f.fh)


TMP_SUFFIX = ".volfilter-tmp"


def _remove_stale_temporaries(folder: str, prefix: str) -> None:
    """Delete temporaries that a killed earlier write of the same output left behind."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name.startswith(prefix) and TMP_SUFFIX in name:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, which a SLURM job or ``taskset`` limits
    (``os.cpu_count()`` counts the whole node), else every CPU."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity on this platform (macOS, Windows)
        return os.cpu_count() or 1


GZIP_THREADS = 0  # 0: one thread per usable CPU (usable_cpus); the bytes do not depend on it
GZIP_BLOCK = 1 << 20  # deflated independently (primed with the previous block's last 32 KiB)
_WINDOW = 32768  # deflate's window: how far back a block may refer
# magic, deflate, no flags (no name), no timestamp, XFL 0, OS 255 (unknown), in RFC 1952's order
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


def _private_compressor():
    """isal's ``_ParallelCompress`` where it is there and behaves as this code expects, else None."""
    try:
        compressor = _deflate._ParallelCompress(buffersize=GZIP_BLOCK + GZIP_BLOCK // 10, level=GZIP_LEVEL)
        deflated, crc = compressor.compress_and_crc(b"volfilter", b"vf")  # primed, as every call here
        inflated = _deflate.decompressobj(-15, zdict=b"vf").decompress(deflated)
        if crc != _deflate.crc32(b"volfilter") or inflated != b"volfilter":
            return None
        return compressor
    except Exception:  # a future isal may change or drop its private class: the public calls remain
        return None


_STORED_HEAD = 16  # bytes at the start of a stream that are stored, not deflated (_stored_then_primed)


def _stored_then_primed(data, deflate_rest):
    """A stream's first block, ``data``, as a stored deflate block of its first 16 bytes followed
    by the rest deflated by ``deflate_rest(rest, dictionary) -> (deflated, crc32)`` primed with
    those 16 bytes. Returns ``(deflated, crc32, length)``.

    ISA-L's level-1 deflate (2.31 and 2.32, ``igzip_icf_body_h1_gr_bt.asm``) hashes the third
    byte of a stream that starts without history from a register that still holds the address of
    its stream structure, so that byte's place in the hash table, and with it the encoding,
    depends on where isal allocated the compressor: in about one 64 KiB window of the address
    space in five thousand, so once in about five thousand fresh processes (bench/NOTES.md,
    seventeenth session; ``bench/isal_repro.c``). Given a dictionary, ISA-L never takes that path
    (39,981 windows: 8 encodings differ without one, none with it). The stored block needs no
    compressor and is the same everywhere; it costs 5 bytes and leaves 16 uncompressed.
    """
    head = bytes(data[:_STORED_HEAD])
    n = len(head)
    stored = b"\x00" + struct.pack("<HH", n, n ^ 0xFFFF) + head  # BFINAL 0, BTYPE 00, byte-aligned
    crc = _deflate.crc32(head)
    if len(data) == n:
        return stored, crc, n
    rest = memoryview(data)[n:]
    deflated, crc_rest = deflate_rest(rest, head)
    return stored + deflated, _deflate.crc32_combine(crc, crc_rest, len(rest)), len(data)


def _block_deflater():
    """A function ``(data, window) -> (deflated, crc32, length)`` for one thread: ``data`` deflated
    on its own, primed with ``window``, ending on a byte boundary (sync flush). A first block
    (empty ``window``) starts with a stored block (:func:`_stored_then_primed`), so that ISA-L is
    always given a dictionary.

    ISA-L's ``_ParallelCompress`` (what ``isal.igzip_threaded`` uses) does all of it in one call
    without the GIL; the public ``compressobj`` takes four calls, each waiting for the GIL while the
    calling thread runs nibabel's Python loop, and made the writer slower than ISA-L's own threaded
    one (median 232 against 203 ms for 64 MB). It is private to isal, so the public calls stand in
    where it is missing: valid gzip either way, the bytes deterministic for a given isal.
    """
    compressor = _private_compressor()
    if compressor is not None:
        deflate_primed = compressor.compress_and_crc
    else:

        def deflate_primed(data, window):
            z = _deflate.compressobj(GZIP_LEVEL, _deflate.DEFLATED, -15, zdict=window)
            return z.compress(data) + z.flush(_deflate.Z_SYNC_FLUSH), _deflate.crc32(data)

    def deflate(data, window):
        if not window:
            return _stored_then_primed(data, deflate_primed)
        return (*deflate_primed(data, window), len(data))

    return deflate


class _ParallelGzip:
    """One gzip member deflated in independent 1 MiB blocks on worker threads and written in order
    by the calling thread (as pigz does), at most two blocks per worker in flight.

    ISA-L's threaded writer (``isal.igzip_threaded``), used before, does the same with a writer
    thread and a queue per worker. 64 MB of float32 (the bench volume), 2 threads, 2-core VM, 30
    alternated pairs: :func:`save` 219.5 -> 199.7 ms (median; paired ratio 0.94), the volume-by-volume
    writer 210.5 -> 193.7 ms (0.93). Its gzip header also had XFL and OS swapped.
    """

    def __init__(self, fh, threads: int):
        self._fh = fh
        self._pool = None
        if threads > 1:
            local = threading.local()

            def deflate(data, window):  # one compressor per worker thread
                if not hasattr(local, "deflate"):
                    local.deflate = _block_deflater()
                return local.deflate(data, window)

            self._deflate = deflate
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="volfilter-gzip")
        else:
            self._deflate = _block_deflater()
        self._pending = collections.deque()
        self._limit = 2 * threads
        self._window = b""
        self._crc = 0
        self._size = 0
        fh.write(_GZIP_HEADER)

    @property
    def in_flight(self) -> int:
        """How many of the blocks handed to :meth:`write` may still be unread when it returns (the
        last ones handed over); every earlier block has been deflated."""
        return 0 if self._pool is None else self._limit - 1

    def write(self, data) -> None:
        """Deflate ``data``, a buffer that nobody changes until it has been deflated (see in_flight)."""
        window, self._window = self._window, bytes(data[-_WINDOW:])  # nothing of data is kept past that
        if self._pool is None:
            self._emit(self._deflate(data, window))
            return
        self._pending.append(self._pool.submit(self._deflate, data, window))
        while len(self._pending) >= self._limit:
            self._emit(self._pending.popleft().result())

    def _emit(self, done) -> None:
        deflated, crc, n = done
        self._fh.write(deflated)
        self._crc = _deflate.crc32_combine(self._crc, crc, n)
        self._size += n

    def close(self) -> None:
        """Write the remaining blocks, the final empty block and the trailer; the workers end in any case."""
        try:
            while self._pending:
                self._emit(self._pending.popleft().result())
            self._fh.write(_deflate.compress(b"", wbits=-15))
            self._fh.write(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))
        finally:
            self._pending.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)


class _GzipStream(io.RawIOBase):
    """A deterministic gzip stream on ``fh``: no name, no timestamp, multithreaded with ISA-L.

    Blocks are deflated independently (:class:`_ParallelGzip`), so the stream cuts the bytes it is
    given into whole 1 MiB blocks counted from the start of the file: the gzip bytes are a function
    of the NIfTI bytes alone, whatever the thread count, however the caller (nibabel, or a
    volume-by-volume writer) slices its writes. It also knows its position (nibabel asks ``tell()``).
    """

    def __init__(self, fh):
        super().__init__()
        self._pos = 0
        self._tail = bytearray()
        if _deflate is not None:
            self._gz = _ParallelGzip(fh, GZIP_THREADS or usable_cpus())
        else:  # one deflate stream: its bytes never depended on how the writes were cut
            self._gz = _gzip_impl.GzipFile(filename="", mode="wb", fileobj=fh, compresslevel=GZIP_LEVEL, mtime=0)

    def writable(self):
        return True

    def write(self, b):
        view = memoryview(b).cast("B")
        n = len(view)
        self._pos += n
        if self._tail:
            take = min(GZIP_BLOCK - len(self._tail), n)
            self._tail += view[:take]
            view = view[take:]
            if len(self._tail) < GZIP_BLOCK:
                return n
            self._gz.write(self._tail)
            self._tail = bytearray()
        whole = len(view) - len(view) % GZIP_BLOCK
        # The caller may change its buffer once write() returns (the GPU path downloads every result
        # into one). The blocks still unread then (the last three with two workers) are copied; the
        # earlier ones have been deflated by then and go without a copy, as does all of an immutable
        # bytes object (what nibabel hands over). Copying every block, as before, made the
        # volume-by-volume writer ~6% slower (64 MB, 2-core VM, 11 alternated pairs: paired ratio 0.94).
        in_flight = getattr(self._gz, "in_flight", 0)  # the zlib fallback deflates before it returns
        copied_from = whole if isinstance(b, bytes) else max(0, whole - in_flight * GZIP_BLOCK)
        for start in range(0, whole, GZIP_BLOCK):
            block = view[start : start + GZIP_BLOCK]
            self._gz.write(block if start < copied_from else bytes(block))
        self._tail += view[whole:]
        return n

    def tell(self):
        return self._pos

    def seek(self, offset, whence=0):
        if whence == 0 and offset == self._pos:
            return self._pos
        raise OSError("stream cannot seek")

    def close(self):
        """Write the last block and the gzip trailer; also on failure (the worker threads must end)."""
        if self.closed:
            return
        try:
            if self._tail:
                self._gz.write(self._tail)
                self._tail = bytearray()
        finally:
            try:
                self._gz.close()
            finally:
                super().close()


class NiftiStreamWriter:
    """Write a derived NIfTI volume by volume (atomically), bytes identical to :func:`save`.

    >>> # with NiftiStreamWriter(path, reference, shape, "volfilter gaussian") as w: w.write(vol)
    """

    def __init__(self, path, reference, shape, description: str = "volfilter"):
        ext = nifti_extension(path)
        img = derived_image(np.broadcast_to(np.float32(0), tuple(shape)), reference, description)
        img.update_header()
        hdr = img.header
        self._file = AtomicFile(path)
        try:
            self._gz = _GzipStream(self._file.fh) if ext == ".nii.gz" else None
            self._out = self._gz if self._gz is not None else self._file.fh
            _write_header(self._out, hdr)
        except BaseException:
            self._close_gzip()
            self._file.abort()
            raise

    def write(self, volume: np.ndarray) -> None:
        """Append one 3-D volume (any order; written in NIfTI's Fortran order)."""
        data = np.asfortranarray(volume, dtype=np.float32)
        self._out.write(memoryview(data.T).cast("B"))

    def _close_gzip(self):
        if getattr(self, "_gz", None) is not None:
            self._gz.close()  # also on failure: the gzip worker threads must not outlive us
            self._gz = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            self._close_gzip()
        except BaseException:
            self._file.abort()
            raise
        return self._file.__exit__(exc_type, exc, tb)


def _write_header(out, hdr) -> None:
    """What nibabel writes before the data of a single-file NIfTI: the header, its extensions and
    zeros up to the data offset."""
    hdr.write_to(out)
    out.write(b"\0" * (int(hdr.get_data_offset()) - out.tell()))


def _plain_float32(img) -> np.ndarray | None:
    """``img``'s data where nibabel would write it unchanged (a single-file NIfTI holding a native
    float32 array, stored as native float32 with scaling 1 and 0, as :func:`derived_image` makes
    it), else None."""
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) or not isinstance(img.dataobj, np.ndarray):
        return None
    hdr, data = img.header, img.dataobj
    if data.dtype != np.float32 or hdr.get_data_dtype() != np.float32:  # both native (a swapped dtype differs)
        return None
    if float(hdr["scl_slope"]) != 1.0 or float(hdr["scl_inter"]) != 0.0:
        return None
    return data


def save(img, path) -> None:
    """Write ``img`` atomically; ``.nii.gz`` is compressed with a fast, deterministic gzip.

    A float32 image as :func:`derived_image` makes it is written from its array's own memory;
    nibabel copies the array slice by slice first (``tobytes``): a 64 MB ``.nii.gz`` write took
    ~10% longer that way (2-core VM, 11 alternated pairs: paired ratios 0.90, 0.91, 0.94). Other
    images go through nibabel. The bytes are nibabel's either way (tested).
    """
    path = os.fspath(path)
    ext = nifti_extension(path)
    data = _plain_float32(img)

    def write_image(out):
        if data is None:
            img.to_file_map({"header": FileHolder(fileobj=out), "image": FileHolder(fileobj=out)})
            return
        img.update_header()  # what nibabel does first: shape, qform/sform codes, magic
        _write_header(out, img.header)
        out.write(memoryview(np.asfortranarray(data).T).cast("B"))  # NIfTI's order, no copy if it is already

    def write(fh):
        if ext == ".nii.gz":
            gz = _GzipStream(fh)
            try:
                write_image(gz)
            finally:
                gz.close()  # also on failure: the gzip worker threads must not outlive us
        else:
            write_image(fh)

    atomic_write(path, write)
