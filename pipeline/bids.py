"""Input discovery: a BIDS dataset or a plain folder of NIfTI files, parsed strictly.

Every discovered input gets an output *base* (relative path without the
``desc`` entity) and *suffix* such that a derivative is
``<output_dir>/<base>_desc-<name><suffix>.nii.gz``. BIDS labels are
alphanumeric and folder names must agree with the file name's entities, so
nothing in a file name can place an output outside the output folder.

Examples
--------
>>> parse_bids_path("sub-01/ses-pre/anat/sub-01_ses-pre_T1w.nii.gz").base
'sub-01/ses-pre/anat/sub-01_ses-pre'
>>> parse_bids_path("sub-01/anat/sub-02_T1w.nii.gz") is None  # folder and name disagree
True
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from .errors import VolfilterError

LABEL = r"[A-Za-z0-9]+"
_ENTITY = re.compile(rf"^([a-z]+)-({LABEL})$")
_SUFFIX = re.compile(rf"^{LABEL}$")
_DATATYPE = re.compile(r"^[a-z]+$")
NIFTI_RE = re.compile(r"\.nii(\.gz)?$")
# Folders of a BIDS root that hold no raw subject data.
SKIP_DIRS = {"derivatives", "sourcedata", "code", "stimuli", "phenotype"}


@dataclass(frozen=True)
class InputVolume:
    """One input image and where its derivatives go (relative to the output folder)."""

    path: str
    base: str  # e.g. "sub-01/ses-pre/anat/sub-01_ses-pre" or a plain file's stem
    suffix: str  # e.g. "_T1w"; "" for plain folders
    subject: str = ""
    session: str = ""
    root: str = ""  # the BIDS dataset root; "" for a plain folder

    @property
    def key(self) -> str:
        return self.base + self.suffix

    def derivative(self, name: str, ext: str = ".nii.gz") -> str:
        return f"{self.base}_desc-{name}{self.suffix}{ext}"


def parse_bids_path(relpath: str, root: str = "") -> InputVolume | None:
    """Parse ``sub-X[/ses-Y]/<datatype>/sub-X[_ses-Y][_key-value...]_<suffix>.nii[.gz]``.

    Returns None for anything that does not follow that grammar exactly.
    An existing ``desc`` entity (e.g. fMRIPrep's ``desc-preproc``) is replaced
    by the filter's; :func:`discover` refuses inputs that would then collide.
    """
    parts = relpath.replace(os.sep, "/").split("/")
    if len(parts) not in (3, 4) or not NIFTI_RE.search(parts[-1]):
        return None
    fname = NIFTI_RE.sub("", parts[-1])
    datatype = parts[-2]
    if not _DATATYPE.match(datatype):
        return None
    parsed = _entities_and_suffix(fname)
    if parsed is None or next(iter(parsed[0]), None) != "sub":
        return None
    ent, suffix = parsed
    if parts[0] != f"sub-{ent['sub']}":
        return None
    if len(parts) == 4:
        if "ses" not in ent or parts[1] != f"ses-{ent['ses']}":
            return None
    elif "ses" in ent:
        return None
    name = "_".join(f"{k}-{v}" for k, v in ent.items() if k != "desc")
    base = "/".join(parts[:-1]) + "/" + name
    path = os.path.join(root, *parts) if root else relpath
    return InputVolume(
        path=path, base=base, suffix="_" + suffix, subject=ent["sub"], session=ent.get("ses", ""), root=root
    )


def _entities_and_suffix(stem: str):
    """``({key: label}, suffix)`` of a BIDS file name without extension, entities in file order, or
    None if it is not one (a field that is not key-label, a key twice, a bad suffix)."""
    fields = stem.split("_")
    if not _SUFFIX.match(fields[-1]):
        return None
    entities = {}
    for field in fields[:-1]:
        m = _ENTITY.match(field)
        if not m or m.group(1) in entities:
            return None
        entities[m.group(1)] = m.group(2)
    return entities, fields[-1]


def applicable_sidecars(path: str, root: str, candidates) -> list[str]:
    """Of the JSON files ``candidates``, those that apply to the data file ``path`` of the BIDS
    dataset at ``root``, from the least specific to the most specific (the order to merge them in).

    BIDS inheritance principle: a sidecar applies when it has the data file's suffix and a subset
    of its entities, in the data file's folder or a folder above it up to the root; nearer folders,
    then more entities, are more specific.
    """
    parts = os.path.relpath(path, root).split(os.sep)
    if parts[0] == os.pardir:
        raise VolfilterError(f"{path}: not inside the BIDS dataset {root}")
    parsed = _entities_and_suffix(NIFTI_RE.sub("", parts[-1]))
    if parsed is None:
        return []
    entities, suffix = parsed
    ranked = []
    for cand in candidates:
        folder = os.path.relpath(os.path.dirname(cand), root).split(os.sep)
        folder = [] if folder == [os.curdir] else folder
        name = os.path.basename(cand)
        side = _entities_and_suffix(name[: -len(".json")]) if name.endswith(".json") else None
        if side and side[1] == suffix and side[0].items() <= entities.items() and folder == parts[: len(folder)]:
            ranked.append((len(folder), len(side[0]), cand))
    return [c for *_, c in sorted(ranked)]


def metadata_files(path: str, root: str) -> list[str]:
    """The JSON sidecars on disk that apply to ``path`` (:func:`applicable_sidecars`)."""
    parts = os.path.relpath(path, root).split(os.sep)
    candidates = []
    for depth in range(len(parts)):
        folder = os.path.join(root, *parts[:depth])
        if os.path.isdir(folder):
            candidates += [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(".json")]
    return applicable_sidecars(path, root, candidates)


def inherited_metadata(path: str, root: str) -> dict:
    """The metadata of a BIDS data file: :func:`metadata_files` merged, the nearer file winning."""
    merged = {}
    for side in metadata_files(path, root):
        try:
            with open(side, encoding="utf-8") as fh:
                meta = json.load(fh)
        except (OSError, ValueError) as exc:
            raise VolfilterError(f"{side}: not a readable JSON sidecar ({exc})") from None
        if not isinstance(meta, dict):
            raise VolfilterError(f"{side}: a JSON sidecar must hold an object, not {type(meta).__name__}")
        merged.update(meta)
    return merged


def is_bids_root(path: str) -> bool:
    """A folder is treated as BIDS if it has dataset_description.json or sub-* folders."""
    if os.path.isfile(os.path.join(path, "dataset_description.json")):
        return True
    return any(n.startswith("sub-") and os.path.isdir(os.path.join(path, n)) for n in os.listdir(path))


def discover(input_dir: str, suffixes=("T1w",), participants=()) -> tuple[list[InputVolume], list[str]]:
    """Find the input volumes under ``input_dir``.

    Returns ``(volumes, skipped)``: the volumes sorted by path, and a message
    for every NIfTI-named file that was not taken (and why), so nothing is
    dropped silently.
    """
    if not os.path.isdir(input_dir):
        raise VolfilterError(f"input_dir {input_dir!r} is not a folder")
    if is_bids_root(input_dir):
        return _discover_bids(input_dir, tuple(suffixes), _participant_labels(participants))
    return _discover_plain(input_dir)


def _participant_labels(participants) -> set[str]:
    return {p[4:] if p.startswith("sub-") else p for p in participants or ()}


def selected(vol: InputVolume, suffixes, wanted: set[str]) -> bool:
    """True if ``vol`` has one of ``suffixes`` and its subject is wanted (empty: all)."""
    return vol.suffix[1:] in suffixes and (not wanted or vol.subject in wanted)


def example_inputs(example_dir: str, suffixes=("T1w",), participants=()) -> list[InputVolume]:
    """The bundled example's inputs, known before the example is written."""
    from .example import EXAMPLE_FILES

    wanted = _participant_labels(participants)
    vols = [parse_bids_path(rel, example_dir) for rel in EXAMPLE_FILES]
    return sorted((v for v in vols if selected(v, tuple(suffixes), wanted)), key=lambda v: v.path)


def _discover_bids(root, suffixes, wanted):
    volumes, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        for fname in sorted(filenames):
            if not NIFTI_RE.search(fname) or fname.startswith("."):
                continue
            rel = fname if rel_dir == "." else os.path.join(rel_dir, fname)
            vol = parse_bids_path(rel, root)
            if vol is None:
                skipped.append(f"{rel}: not a valid BIDS file name or location")
                continue
            if selected(vol, suffixes, wanted):
                volumes.append(vol)
    return _no_collisions(sorted(volumes, key=lambda v: v.path)), skipped


def _no_collisions(volumes):
    seen = {}
    for vol in volumes:
        if vol.key in seen:
            raise VolfilterError(
                f"{seen[vol.key].path} and {vol.path} would get the same output names (they differ only in "
                "desc entity or extension); move one out of input_dir"
            )
        seen[vol.key] = vol
    return volumes


_PLAIN_STEM = re.compile(r"^[^./\\{}][^/\\{}]*$")


def _discover_plain(root):
    volumes, skipped = [], []
    for fname in sorted(os.listdir(root)):
        full = os.path.join(root, fname)
        if not NIFTI_RE.search(fname) or not os.path.isfile(full):
            continue
        stem = NIFTI_RE.sub("", fname)
        if not _PLAIN_STEM.match(stem) or stem in (".", ".."):
            skipped.append(f"{fname}: file name cannot be used for an output name (hidden, braces or path characters)")
            continue
        volumes.append(InputVolume(path=full, base=stem, suffix=""))
    return _no_collisions(volumes), skipped
