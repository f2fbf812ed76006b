"""Filter whole images and files: load once, filter on CPU or GPU, write with provenance.

Examples
--------
>>> import numpy as np, nibabel as nib
>>> img = nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8), np.float32), np.diag([1, 1, 2, 1]))
>>> out = filter_image(img, "gaussian", fwhm_mm=3, backend="cpu")
>>> out.get_data_dtype() == np.float32, out.shape == img.shape, bool(np.allclose(out.affine, img.affine))
(True, True, True)
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from . import backend as backends
from . import io, provenance
from .errors import VolfilterError
from .filters import apply_filter, check_params


@dataclass(frozen=True)
class FilterJob:
    """One derived output: which filter, its parameters and where it goes."""

    kind: str
    params: dict
    output: str


def _as_volume(img_or_path) -> io.Volume:
    if isinstance(img_or_path, (str, os.PathLike)):
        return io.load(img_or_path)
    if isinstance(img_or_path, (nib.Nifti1Image, nib.Nifti2Image)):
        data = img_or_path.get_fdata(dtype=np.float32)
        if data.ndim not in (3, 4):
            raise VolfilterError(f"expected a 3-D or 4-D image, got {data.ndim}-D")
        return io.Volume(header=img_or_path.header, affine=img_or_path.affine, data=data, path="<in-memory image>")
    raise VolfilterError(f"expected a NIfTI image or a path, got {type(img_or_path).__name__}")


def filter_image(img, filter, *, backend="auto", mode="reflect", mask=None, **params):
    """Filter a NIfTI image (or path) and return a new float32 ``nibabel`` image.

    Parameters
    ----------
    img : Nifti1Image, Nifti2Image, str or PathLike
    filter : str
        Filter name (``volfilter filters`` lists them).
    backend : {'auto', 'cpu', 'gpu'}
    mode : str
        Border handling (reflect, nearest, mirror, constant, wrap).
    mask : image, path or bool array, optional
        Filter within the mask; voxels outside become 0.
    **params
        The filter's parameters, e.g. ``fwhm_mm=6``.
    """
    vol = _as_volume(img)
    be = backends.resolve(backend)
    mask_arr = _mask_array(mask, vol)
    data = be.to_device(vol.data)
    dmask = None if mask_arr is None else be.to_device(mask_arr)
    out = apply_filter(data, vol.voxel_mm, filter, mode=mode, mask=dmask, **params)
    return io.derived_image(be.to_host(out), vol, f"volfilter {filter}")


def _mask_array(mask, reference):
    if mask is None:
        return None
    if isinstance(mask, np.ndarray):
        shape = tuple(reference.data.shape[:3])
        if mask.shape != shape:
            raise VolfilterError(f"mask shape {mask.shape} does not match the image's {shape}")
        return mask.astype(bool)
    if isinstance(mask, (str, os.PathLike)):
        return io.load_mask(mask, reference)
    mdata = np.asanyarray(mask.dataobj)
    return _mask_array(np.isfinite(mdata) & (mdata != 0), reference)


def filter_files(volumes, *, backend="auto", mode="reflect", sidecars=True, bids_root=None) -> str:
    """:func:`filter_file` for several inputs in one process: ``volumes`` is a sequence of
    ``(input_path, jobs, mask_path)``.

    A process, its imports and (on the GPU) CuPy's context and kernels serve them all, instead of
    one fresh process per volume. Every input's header, every output name and every parameter is
    checked before the first volume is read; then the volumes are filtered in order, each
    written atomically (a failure leaves the earlier volumes' complete outputs and nothing of the
    failing one's).
    """
    be = backends.resolve(backend)
    checked = []
    seen = {}
    for input_path, jobs, mask_path in volumes:
        input_path = os.fspath(input_path)
        io.read_header(input_path)
        checked.append((input_path, _check_jobs(input_path, jobs), mask_path))
        for job in jobs:
            key = os.path.realpath(job.output)
            if key in seen:
                raise VolfilterError(f"{job.output}: named twice as an output (for {seen[key]} and {input_path})")
            seen[key] = input_path
    for input_path, _, _ in checked:
        if os.path.realpath(input_path) in seen:
            raise VolfilterError(f"{input_path}: an input that is also an output of this batch; choose another name")
    _filter_checked(checked, be, mode, sidecars, bids_root)
    return be.name


def _check_jobs(input_path, jobs):
    checked = []
    for job in jobs:
        io.nifti_extension(job.output)
        if io.same_file(job.output, input_path):
            raise VolfilterError(f"{job.output}: output would overwrite the input; choose another name")
        checked.append((job, check_params(job.kind, dict(job.params))))
    return checked


def filter_file(input_path, jobs, *, backend="auto", mode="reflect", mask_path=None, sidecars=True, bids_root=None):
    """Read ``input_path`` once, volume by volume, and write every job's output (and JSON sidecar).

    ``bids_root``: the BIDS dataset ``input_path`` belongs to; the sidecars then carry its
    metadata and name it by a BIDS URI (:func:`pipeline.provenance.source_metadata`).

    A 4-D series is streamed: memory holds one input volume (two while the
    next is read ahead, see :data:`READ_AHEAD`) and one output volume per
    job, not the series. On the GPU each volume is uploaded once
    and stays on the device for all filters. Every parameter is validated
    before anything is read, and every output is written atomically: if
    anything fails, no output of this call appears.

    Returns
    -------
    str
        The backend that ran (``cpu`` or ``gpu``).
    """
    input_path = os.fspath(input_path)
    checked = _check_jobs(input_path, jobs)
    be = backends.resolve(backend)
    _filter_checked([(input_path, checked, mask_path)], be, mode, sidecars, bids_root)
    return be.name


READ_AHEAD = None  # None: when the process may use 4 or more CPUs (--threads, else the cores); True; False


def _read_ahead() -> bool:
    """Whether to read the next volume while this one is filtered and written. On 2 cores, where the
    gzip writers already use both, it measured within noise (bench/breakdown.py, 4 volumes of 256³:
    4.4-5.0 s in turn, 4.8-5.4 s ahead), so it needs more cores than that."""
    if READ_AHEAD is not None:
        return READ_AHEAD
    return (io.GZIP_THREADS or io.usable_cpus()) >= 4


class _Volumes:
    """The 3-D volumes of several inputs in order, as ``(stream, volume, last)``; ``last`` marks an
    input's final volume. With ``ahead``, the next item (the next volume of this series, or the
    next input's first) is read on a helper thread while the caller filters and writes this one.

    Decompressing a ``.nii.gz`` is single-threaded (~310 ms per 256³ float32 volume on the H100
    host, ~45% of a volume's time there) and releases the GIL, so it can run beside the gzip
    writers that finish the previous input. Memory: one input volume more.
    """

    def __init__(self, paths, ahead: bool):
        self._items = self._read(list(paths))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="volfilter-read") if ahead else None
        self._pending = self._pool.submit(next, self._items, None) if self._pool else None

    @staticmethod
    def _read(paths):
        for path in paths:
            with io.open_volumes(path) as stream:
                n = io.n_volumes(stream.shape)
                for t, vol in enumerate(stream.volumes):
                    yield stream, vol, t == n - 1

    def next(self):
        if self._pool is None:
            item = next(self._items, None)
        else:
            item, self._pending = self._pending.result(), None  # a read error is raised here, in order
            if item is not None:
                self._pending = self._pool.submit(next, self._items, None)
        if item is None:
            raise RuntimeError("no volume left to read")  # cannot happen: the callers stop at `last`
        return item

    def close(self):
        """Stop reading: wait for a read in flight (its file must not close under it), then close the file."""
        try:
            if self._pending is not None:
                with contextlib.suppress(Exception):  # the caller's own error is the one to report
                    self._pending.result()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
            self._items.close()


def _filter_checked(items, be, mode, sidecars, bids_root):
    """Filter ``items``, ``[(input_path, checked, mask_path)]`` with ``checked`` from :func:`_check_jobs`
    and ``be`` resolved, one input after the other; each input's outputs are complete (and its
    sidecars written) before the next input's are begun."""
    volumes = _Volumes([path for path, _, _ in items], _read_ahead())
    try:
        for input_path, checked, mask_path in items:
            source = provenance.source_metadata(input_path, bids_root) if sidecars else None  # a bad sidecar fails here
            with contextlib.ExitStack() as hashing:
                # The sidecars' checksums are computed on a second core while the input is decompressed
                # (single-threaded): ~45 ms per 50 MB file that the job no longer waits for.
                pool = hashing.enter_context(ThreadPoolExecutor(1)) if sidecars else None
                in_sha = pool.submit(provenance.sha256, input_path) if pool else None
                mask_sha = pool.submit(provenance.sha256, mask_path) if pool and mask_path else None
                _filter_stream(volumes, input_path, checked, be, mode, mask_path)
                if pool:
                    shas = in_sha.result(), mask_sha and mask_sha.result()
                    _write_sidecars(input_path, checked, be, mode, mask_path, *shas, source)
    finally:
        volumes.close()


def _filter_stream(volumes, input_path, checked, be, mode, mask_path):
    stream, vol, last = volumes.next()
    with contextlib.ExitStack() as outputs:
        mask = None if mask_path is None else io.load_mask(mask_path, stream)
        dmask = None if mask is None else be.to_device(mask)
        writers = [
            outputs.enter_context(io.NiftiStreamWriter(job.output, stream, stream.shape, f"volfilter {job.kind}"))
            for job, _ in checked
        ]
        # One host buffer for every download (page-locked on the GPU); by the time write() returns,
        # the writers have deflated what they were handed or copied the rest.
        staging = be.staging(stream.shape[:3])
        any_finite = False
        while True:
            any_finite = any_finite or backends.has_finite(vol)
            dvol = be.to_device(vol)
            del vol  # on the GPU, the host copy is not needed any more
            for (job, params), writer in zip(checked, writers, strict=True):
                out = apply_filter(dvol, stream.voxel_mm, job.kind, mode=mode, mask=dmask, **params)
                writer.write(be.to_host(out, out=staging))
            if last:
                break
            stream, vol, last = volumes.next()
        if not any_finite:
            raise VolfilterError(f"{input_path}: every voxel is NaN or infinite; there is nothing to filter")


def _write_sidecars(input_path, checked, be, mode, mask_path, in_sha, mask_sha, source):
    for job, params in checked:
        meta = provenance.filter_sidecar(
            input_path=input_path,
            input_sha256=in_sha,
            kind=job.kind,
            params=params,
            mode=mode,
            backend=be.name,
            mask_path=mask_path,
            mask_sha256=mask_sha,
            source=source,
        )
        provenance.write_json(provenance.sidecar_path(job.output), meta)
