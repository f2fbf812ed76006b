"""Strict BIDS and plain-folder input discovery."""

import pytest

from pipeline import VolfilterError
from pipeline.bids import discover, parse_bids_path


@pytest.mark.parametrize(
    "rel,base,suffix",
    [
        ("sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01", "_T1w"),
        ("sub-01/ses-pre/anat/sub-01_ses-pre_T1w.nii", "sub-01/ses-pre/anat/sub-01_ses-pre", "_T1w"),
        ("sub-A1/func/sub-A1_task-rest_run-2_bold.nii.gz", "sub-A1/func/sub-A1_task-rest_run-2", "_bold"),
        ("sub-01/anat/sub-01_desc-preproc_T1w.nii.gz", "sub-01/anat/sub-01", "_T1w"),
    ],
)
def test_valid_names(rel, base, suffix):
    vol = parse_bids_path(rel)
    assert (vol.base, vol.suffix) == (base, suffix)
    assert vol.derivative("smooth6") == f"{base}_desc-smooth6{suffix}.nii.gz"


@pytest.mark.parametrize(
    "rel",
    [
        "sub-01/anat/sub-02_T1w.nii.gz",  # folder and name disagree
        "sub-01/ses-a/anat/sub-01_ses-b_T1w.nii.gz",
        "sub-01/anat/sub-01_ses-a_T1w.nii.gz",  # session entity without folder
        "sub-01/anat/sub-01_acq-..x_T1w.nii.gz",  # label characters
        "sub-../anat/sub-.._T1w.nii.gz",
        "sub-01/anat/sub-01_T1w copy.nii.gz",
        "sub-01/anat/sub-01_T1w.json",
        "sub-01/sub-01_T1w.nii.gz",  # no datatype folder
        "sub-01/anat/sub-01_run-1_run-2_T1w.nii.gz",  # repeated entity
        "sub-01/anat/task-x_sub-01_T1w.nii.gz",  # sub must come first
    ],
)
def test_invalid_names_are_rejected(rel):
    assert parse_bids_path(rel) is None


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_discover_bids_selects_suffix_and_participants(tmp_path):
    for rel in ["sub-01/anat/sub-01_T1w.nii.gz", "sub-02/anat/sub-02_T1w.nii.gz", "sub-01/func/sub-01_task-a_bold.nii.gz",
                "sub-01/anat/sub-01_T1w.json", "derivatives/x/sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/bad name.nii"]:  # fmt: skip
        _touch(tmp_path / rel)
    (tmp_path / "dataset_description.json").write_text("{}")
    vols, skipped = discover(str(tmp_path), ["T1w"], ["sub-02"])
    assert [v.key for v in vols] == ["sub-02/anat/sub-02_T1w"]
    vols, skipped = discover(str(tmp_path), ["T1w", "bold"], [])
    assert len(vols) == 3
    assert skipped == ["sub-01/anat/bad name.nii: not a valid BIDS file name or location"]


def test_discover_plain_folder(tmp_path):
    for name in ["a.nii.gz", "with space.nii", "süb.nii.gz", ".hidden.nii", "..nii.gz", "{x}.nii", "notes.txt"]:
        _touch(tmp_path / name)
    vols, skipped = discover(str(tmp_path))
    assert sorted(v.base for v in vols) == ["a", "süb", "with space"]
    assert all(v.suffix == "" for v in vols)
    assert len(skipped) == 3  # ".hidden.nii", "..nii.gz" and "{x}.nii", each reported
    assert vols[0].derivative("s") == "a_desc-s.nii.gz"


def test_collisions_are_refused(tmp_path):
    _touch(tmp_path / "a.nii")
    _touch(tmp_path / "a.nii.gz")
    with pytest.raises(VolfilterError, match="same output names"):
        discover(str(tmp_path))
