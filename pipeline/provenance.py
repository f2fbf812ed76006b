"""Provenance: JSON sidecars, checksums and BIDS-derivatives dataset descriptions."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform

from . import __version__
from .errors import VolfilterError
from .io import atomic_write


def sha256(path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def source_sha256() -> str:
    """SHA-256 of this package's code: its ``*.py`` files and ``_native.c``, by name and content.

    Names the exact code that made a result, which the version number does not (a checkout keeps
    one version across many commits, and an edited one has none of its own).
    """
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for name in sorted(n for n in os.listdir(here) if n.endswith(".py") or n == "_native.c"):
        with open(os.path.join(here, name), "rb") as fh:
            data = fh.read()
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def versions(backend: str = "cpu") -> dict:
    """Versions of the code and libraries that shaped the result.

    ``cpu_kernels`` says which CPU implementation ran: the compiled kernels or scipy.ndimage (no C
    compiler at install, or ``VOLFILTER_NO_NATIVE``); they agree to ~1e-6, not bit for bit.
    """
    import nibabel
    import numpy
    import scipy

    from .backend import cpu_kernels
    from .io import GZIP_BACKEND

    out = {
        "volfilter": __version__,
        "volfilter_source_sha256": source_sha256(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "nibabel": nibabel.__version__,
        "gzip": GZIP_BACKEND,
    }
    if backend == "gpu":
        import cupy

        out["cupy"] = cupy.__version__
    else:
        out["cpu_kernels"] = "scipy.ndimage" if cpu_kernels() is None else "compiled (pipeline/_native.c)"
    return out


def sidecar_path(image_path) -> str:
    """``x.nii.gz`` / ``x.nii`` → ``x.json``."""
    p = os.fspath(image_path)
    for ext in (".nii.gz", ".nii"):
        if p.endswith(ext):
            return p[: -len(ext)] + ".json"
    return p + ".json"


def write_text(path, text: str) -> None:
    """Write UTF-8 ``text`` atomically."""
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def write_json(path, payload: dict) -> None:
    """Write ``payload`` as sorted, indented JSON, atomically."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


SOURCE_DATASET = "raw"  # the name under which dataset_description.json links the input BIDS dataset


def source_metadata(input_path, bids_root=None) -> tuple[dict, str]:
    """``(metadata, source)`` of an input for its derivatives' sidecars.

    With ``bids_root`` (the input's BIDS dataset): the input's own metadata, its sidecars merged
    by the BIDS inheritance principle (RepetitionTime, TaskName, EchoTime... stay true of a
    spatially filtered volume), and a BIDS URI into that dataset. Otherwise no metadata and the
    input's file name.
    """
    from .bids import inherited_metadata

    input_path = os.fspath(input_path)
    if bids_root is None:
        return {}, os.path.basename(input_path)
    if not os.path.isdir(bids_root):
        raise VolfilterError(f"--bids-root {bids_root}: not a folder")
    rel = os.path.relpath(input_path, bids_root).replace(os.sep, "/")
    return inherited_metadata(input_path, os.fspath(bids_root)), f"bids:{SOURCE_DATASET}:{rel}"


def filter_sidecar(
    *, input_path, input_sha256, kind, params, mode, backend, mask_path=None, mask_sha256=None, source=None
):
    """The sidecar of one derived volume: enough to redo it exactly.

    ``source``: :func:`source_metadata`'s pair; the input's metadata comes first, volfilter's
    keys override it. It holds no timestamp and no host name, so reruns produce identical bytes.
    """
    inherited, source = source or source_metadata(input_path)
    payload = {
        **inherited,
        "Description": f"{kind} filter applied by volfilter",
        "Sources": [source],
        "InputSHA256": input_sha256,
        "Filter": {"kind": kind, **{k: v for k, v in sorted(params.items())}},
        "BorderMode": mode,
        "Backend": backend,
        "SoftwareVersions": versions(backend),
    }
    if mask_path is not None:
        payload["Mask"] = {"file": os.path.basename(os.fspath(mask_path)), "SHA256": mask_sha256}
    return payload


def dataset_description(name: str = "volfilter", source_link: str | None = None) -> dict:
    """``dataset_description.json`` for a BIDS-derivatives folder.

    ``source_link``: where the input BIDS dataset is, relative to this folder (or a URI); it
    resolves the ``bids:raw:...`` URIs of the sidecars' ``Sources``.
    """
    links = {} if source_link is None else {"DatasetLinks": {SOURCE_DATASET: source_link}}
    return {
        **links,
        "Name": f"{name} derivatives",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "volfilter",
                "Version": __version__,
                "Description": "3-D convolution filters in mm (Gaussian, box, Sobel, Prewitt, sharpen, unsharp, emboss, custom)",
            }
        ],
    }
