"""Strict BIDS and plain-folder input discovery, and the BIDS inheritance of sidecar metadata."""

import json

import pytest

from pipeline import VolfilterError
from pipeline.bids import applicable_sidecars, discover, inherited_metadata, metadata_files, parse_bids_path


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


def write_json(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def test_sidecar_metadata_follows_the_inheritance_principle(tmp_path):
    data = tmp_path / "sub-01/ses-1/func/sub-01_ses-1_task-rest_run-1_bold.nii.gz"
    data.parent.mkdir(parents=True)
    data.write_bytes(b"")
    applies = {
        "task-rest_bold.json": {"TaskName": "rest", "RepetitionTime": 3.0, "EchoTime": 0.03},
        "sub-01/sub-01_bold.json": {"EchoTime": 0.035, "FlipAngle": 70},
        "sub-01/ses-1/func/sub-01_ses-1_task-rest_bold.json": {"RepetitionTime": 2.5},
        "sub-01/ses-1/func/sub-01_ses-1_task-rest_run-1_bold.json": {"SliceTiming": [0.0, 1.0]},
    }
    does_not = {
        "task-other_bold.json": {"TaskName": "other"},  # another task
        "T1w.json": {"RepetitionTime": 9.0},  # another suffix
        "sub-01/ses-1/func/sub-01_ses-1_task-rest_run-2_bold.json": {"RepetitionTime": 7.0},  # another run
        "sub-02/sub-02_bold.json": {"FlipAngle": 90},  # another subject's folder
        "sub-01/ses-1/anat/sub-01_ses-1_bold.json": {"FlipAngle": 10},  # not on the way to the file
        "sub-01/ses-1/func/sub-01_ses-1_task-rest_bold_notes.json": {"FlipAngle": 1},  # not a BIDS name
    }
    for rel, meta in {**applies, **does_not}.items():
        write_json(tmp_path / rel, meta)
    found = metadata_files(str(data), str(tmp_path))
    assert found == [str(tmp_path / rel) for rel in applies]  # least specific first
    assert inherited_metadata(str(data), str(tmp_path)) == {
        "TaskName": "rest", "RepetitionTime": 2.5, "EchoTime": 0.035, "FlipAngle": 70, "SliceTiming": [0.0, 1.0],
    }  # fmt: skip
    # The same choice from names alone (the bundled example's sidecars, before they are written).
    names = [str(tmp_path / rel) for rel in [*does_not, *reversed(list(applies))]]
    assert applicable_sidecars(str(data), str(tmp_path), names) == found


def test_bad_sidecar_and_outside_file_are_one_line_errors(tmp_path):
    data = tmp_path / "sub-01/anat/sub-01_T1w.nii.gz"
    data.parent.mkdir(parents=True)
    (tmp_path / "T1w.json").write_text("{not json")
    with pytest.raises(VolfilterError, match="T1w.json: not a readable JSON sidecar"):
        inherited_metadata(str(data), str(tmp_path))
    (tmp_path / "T1w.json").write_text("[1, 2]")
    with pytest.raises(VolfilterError, match="must hold an object"):
        inherited_metadata(str(data), str(tmp_path))
    with pytest.raises(VolfilterError, match="not inside the BIDS dataset"):
        inherited_metadata(str(tmp_path.parent / "x_T1w.nii.gz"), str(tmp_path))
