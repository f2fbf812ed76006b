"""Helpers for the Snakemake rules: config checks, inputs, resource estimates.

Pure functions, so the workflow's logic is tested without Snakemake.
"""

from __future__ import annotations

import json
import math
import os

from . import bids
from .errors import VolfilterError
from .filters import check_params
from .io import read_header, working_bytes

EXAMPLE = "example"
PYTHON_BASELINE_MB = 400  # interpreter + numpy/scipy/nibabel, measured RSS ~150-250 MB


def check_filters(filters: dict) -> dict:
    """Validate every configured filter with the package's own rules.

    Returns ``{name: {"kind": ..., params...}}`` with defaults filled in.
    Raises :class:`VolfilterError` naming the config key.
    """
    out = {}
    for name, spec in filters.items():
        params = {k: v for k, v in spec.items() if k != "kind"}
        try:
            full = check_params(spec.get("kind", ""), params)
        except VolfilterError as exc:
            raise VolfilterError(f"config key filters.{name}: {exc}") from None
        out[name] = {"kind": spec["kind"], **full}
    return out


def filters_from_configfiles(paths) -> dict | None:
    """The ``filters`` mapping of the last of ``paths`` (``--configfile``) that sets one.

    Snakemake deep-merges config files, so a study's own filter set would be
    added to the defaults instead of replacing them; the workflow uses this to
    make a configfile's ``filters`` the whole set.
    """
    import yaml

    for path in reversed([os.fspath(p) for p in paths or ()]):
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        if isinstance(data, dict) and "filters" in data:
            return data["filters"]
    return None


def filters_json(filters: dict) -> str:
    """Canonical JSON of the checked filters (sorted keys: params change only when values do)."""
    return json.dumps(check_filters(filters), sort_keys=True, separators=(",", ":"))


def kernel_files(filters: dict) -> list[str]:
    return sorted({spec["kernel_file"] for spec in filters.values() if spec.get("kind") == "kernel"})


def find_inputs(config: dict, example_dir: str):
    """``(volumes, skipped)`` for the configured ``input_dir`` (or the bundled example)."""
    suffixes = tuple(config.get("suffixes", ["T1w"]))
    participants = config.get("participants", [])
    if config["input_dir"] == EXAMPLE:
        return bids.example_inputs(example_dir, suffixes, participants), []
    volumes, skipped = bids.discover(config["input_dir"], suffixes, participants)
    if not volumes:
        raise VolfilterError(
            f"config key input_dir: no NIfTI volumes with suffixes {list(suffixes)} found under {config['input_dir']!r}"
        )
    return volumes, skipped


def chunks(volumes: list, size: int) -> list[list]:
    """``volumes`` in consecutive groups of ``size`` (config key volumes_per_job)."""
    return [volumes[i : i + size] for i in range(0, len(volumes), size)]


def volumes_json(chunk, filter_names, out_dir: str, ext: str, masks: dict) -> str:
    """``volfilter batch --volumes-json`` for one group of volumes: each input, its outputs, its mask."""
    items = []
    for vol in chunk:
        item = {"input": vol.path, "outputs": {n: os.path.join(out_dir, vol.derivative(n, ext)) for n in filter_names}}
        if masks.get(vol.key):
            item["mask"] = masks[vol.key]
        items.append(item)
    text = json.dumps(items, separators=(",", ":"))
    if len(text.encode()) > MAX_COMMAND_JSON:
        per_volume = len(text.encode()) // len(chunk) + 1
        raise VolfilterError(
            f"config key volumes_per_job: {len(chunk)} volumes make a job's command line too long "
            f"(Linux takes ~128 kB); use at most {MAX_COMMAND_JSON // per_volume}"
        )
    return text


MAX_COMMAND_JSON = 100_000  # bytes of --volumes-json on one command line (Linux: 128 kB per argument)


MASK_FIELDS = ("base", "suffix", "subject", "session")


def mask_for(config: dict, vol) -> str | None:
    """The mask ``vol`` is filtered within (config key ``mask``), or None.

    ``mask`` is one file for every volume (data in a common space), or a pattern with ``{base}``
    (the input's path relative to ``input_dir`` without extension, suffix and desc entity, e.g.
    ``sub-01/anat/sub-01``; a plain file's stem), ``{suffix}`` (``_T1w``; empty for plain folders),
    ``{subject}`` and ``{session}``: ``/data/fmriprep/{base}_desc-brain_mask.nii.gz``.
    """
    pattern = config.get("mask")
    if not pattern:
        return None
    try:
        return pattern.format(**{f: getattr(vol, f) for f in MASK_FIELDS})
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        fields = ", ".join("{" + f + "}" for f in MASK_FIELDS)
        raise VolfilterError(
            f"config key mask: {pattern!r} is not a valid pattern ({exc!r}); it may use {fields}"
        ) from None


def metadata_files(vol, example: bool) -> list[str]:
    """The BIDS sidecars that apply to ``vol`` ([] for a plain folder): those on disk, or for the
    bundled example those that its first rule writes (known before it runs)."""
    if not vol.root:
        return []
    if example:
        from .example import EXAMPLE_SIDECARS

        candidates = [os.path.join(vol.root, *rel.split("/")) for rel in EXAMPLE_SIDECARS]
        return bids.applicable_sidecars(vol.path, vol.root, candidates)
    return bids.metadata_files(vol.path, vol.root)


def _shape(path: str):
    """The image shape from ``path``'s header, or None when it is not there yet (made by an
    upstream rule) or unreadable (the job will say why)."""
    try:
        return read_header(path).header.get_data_shape()
    except (VolfilterError, OSError):
        return None


def _voxels(path: str) -> int:
    """Voxels in ``path`` (all volumes), or those of one 256³ volume when its header is not readable."""
    shape = _shape(path)
    return 256**3 if shape is None else math.prod(int(s) for s in shape)


def _request_mb(need_bytes: int, attempt: int) -> int:
    """``need_bytes`` in MB, half as much again per retry, plus the interpreter."""
    return int(math.ceil(need_bytes / 2**20 * (1 + 0.5 * (attempt - 1)))) + PYTHON_BASELINE_MB


def mem_mb(path: str, attempt: int = 1) -> int:
    """Memory request for one filter job on ``path``, from its header (grows on retries)."""
    shape = _shape(path)
    return _request_mb(256 * 2**20 if shape is None else working_bytes(shape), attempt)


QC_FLOAT32_COPIES = 3  # the input, one derived volume, the next one being read


def qc_mem_mb(path: str, attempt: int = 1) -> int:
    """Memory request for the QC job of ``path`` (grows on retries).

    A QC job holds the whole input and one derived series as float32 while it reads the next;
    measured peaks, interpreter and matplotlib included: 321 MB for a 256³ volume, 378 MB for a
    64×64×40×200 series (``tests/test_qc.py`` checks the request against a measured peak).
    """
    return _request_mb(QC_FLOAT32_COPIES * 4 * _voxels(path), attempt)


def runtime_min(path: str, n_filters: int, attempt: int = 1) -> int:
    """Generous wall-time request in minutes: ~1 s per 10 M voxels per filter on one core, x30 margin."""
    return max(5, math.ceil(30 * n_filters * _voxels(path) / 1e7 / 60)) * attempt
