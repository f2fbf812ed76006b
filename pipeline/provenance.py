"""Provenance: JSON sidecars, checksums and BIDS-derivatives dataset descriptions."""

from __future__ import annotations

import hashlib
import json
import os
import platform

from . import __version__
from .io import atomic_write


def sha256(path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions(backend: str = "cpu") -> dict:
    """Versions of the libraries that shaped the result."""
    import nibabel
    import numpy
    import scipy

    from .io import GZIP_BACKEND

    out = {
        "volfilter": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "nibabel": nibabel.__version__,
        "gzip": GZIP_BACKEND,
    }
    if backend == "gpu":
        import cupy

        out["cupy"] = cupy.__version__
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


def filter_sidecar(*, input_path, input_sha256, kind, params, mode, backend, mask_path=None, mask_sha256=None):
    """The sidecar of one derived volume: enough to redo it exactly.

    It holds no timestamp and no host name, so reruns produce identical bytes.
    """
    payload = {
        "Description": f"{kind} filter applied by volfilter",
        "Sources": [os.path.basename(os.fspath(input_path))],
        "InputSHA256": input_sha256,
        "Filter": {"kind": kind, **{k: v for k, v in sorted(params.items())}},
        "BorderMode": mode,
        "Backend": backend,
        "SoftwareVersions": versions(backend),
    }
    if mask_path is not None:
        payload["Mask"] = {"file": os.path.basename(os.fspath(mask_path)), "SHA256": mask_sha256}
    return payload


def dataset_description(name: str = "volfilter") -> dict:
    """``dataset_description.json`` for a BIDS-derivatives folder."""
    return {
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
