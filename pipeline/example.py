"""The bundled example: real MRI shipped inside nibabel, laid out as a tiny BIDS dataset.

Nothing is downloaded: the images come from nibabel's own test data.

- ``sub-01/anat/sub-01_T1w.nii.gz``: nibabel's ``anatomical.nii``, a 2 mm T1
  (33×41×25, big-endian int16, LAS).
- ``sub-02/anat/sub-02_T1w.nii.gz``: ``reoriented_anat_moved.nii``, the same
  head resampled to 4 mm in RAS orientation (a second subject with another
  orientation exercises the orientation handling).
- ``sub-01/func/sub-01_task-rest_bold.nii.gz``: ``example4d.nii.gz``, a
  two-volume EPI series (128×96×24×2, TR in pixdim[4]).
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import os

from .io import atomic_write

EXAMPLE_FILES = {
    "sub-01/anat/sub-01_T1w.nii.gz": "anatomical.nii",
    "sub-02/anat/sub-02_T1w.nii.gz": "reoriented_anat_moved.nii",
    "sub-01/func/sub-01_task-rest_bold.nii.gz": "example4d.nii.gz",
}

# The example's JSON sidecars: a top-level one that every rest series inherits (BIDS inheritance
# principle) and the files' own. example4d.nii.gz's header stores pixdim[4] = 2000 with the time unit
# "sec" (milliseconds, by its size); its sidecar gives the TR as BIDS wants it, in seconds.
EXAMPLE_SIDECARS = {
    "task-rest_bold.json": {"TaskName": "rest"},
    "sub-01/anat/sub-01_T1w.json": {"Description": "nibabel anatomical.nii"},
    "sub-01/func/sub-01_task-rest_bold.json": {"RepetitionTime": 2.0},
}


def nibabel_data_file(name: str):
    """Path-like to one of nibabel's bundled test images."""
    return importlib.resources.files("nibabel.tests") / "data" / name


def _gzip_bytes(raw: bytes) -> bytes:
    return gzip.compress(raw, compresslevel=6, mtime=0)


def write_example_dataset(dest) -> list[str]:
    """Write the example BIDS dataset under ``dest``; return the image paths written.

    Re-running rewrites identical bytes.
    """
    dest = os.fspath(dest)
    written = []
    for rel, source in EXAMPLE_FILES.items():
        raw = nibabel_data_file(source).read_bytes()
        payload = raw if source.endswith(".gz") else _gzip_bytes(raw)
        path = os.path.join(dest, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda fh, data=payload: fh.write(data))
        written.append(path)
    meta = {
        "dataset_description.json": {
            "Name": "volfilter example (nibabel test images)",
            "BIDSVersion": "1.10.0",
            "DatasetType": "raw",
        },
        **EXAMPLE_SIDECARS,
    }
    for rel, content in meta.items():
        text = json.dumps(content, indent=2) + "\n"
        atomic_write(os.path.join(dest, *rel.split("/")), lambda fh, t=text: fh.write(t.encode()))
    atomic_write(os.path.join(dest, "participants.tsv"), lambda fh: fh.write(b"participant_id\nsub-01\nsub-02\n"))
    return written
