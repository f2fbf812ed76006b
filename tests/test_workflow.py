"""The Snakemake workflow end to end on tiny BIDS and plain-folder datasets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import assert_same_bytes
from numpy.testing import assert_allclose

from pipeline import filter_image
from pipeline.bids import parse_bids_path

pytestmark = pytest.mark.workflow

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(workdir, config, *extra, check=True):
    cfg = Path(workdir) / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    cmd = [
        *SNAKEMAKE,
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(cfg),
        "-c2",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def make_bids(root, rng):
    aff = np.diag([1.0, 1.2, 2.0, 1.0])
    imgs = {
        "sub-01/ses-pre/anat/sub-01_ses-pre_T1w.nii.gz": rng.normal(100, 10, (10, 12, 8)).astype(np.float32),
        "sub-02/anat/sub-02_T1w.nii.gz": rng.integers(0, 500, (9, 10, 7)).astype(np.int16),
        "sub-01/ses-pre/func/sub-01_ses-pre_task-rest_bold.nii.gz": rng.normal(50, 5, (8, 8, 6, 3)).astype(np.float32),
    }
    for rel, data in imgs.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(data, aff)
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, p)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.10.0"}')
    (root / "README").write_text("tiny")
    (root / "sub-02/anat/sub-02_T1w.json").write_text("{}")
    # BIDS inheritance: the top-level file applies to every rest series, the series' own file wins.
    (root / "task-rest_bold.json").write_text('{"TaskName": "rest", "RepetitionTime": 3.0}')
    (root / "sub-01/ses-pre/func/sub-01_ses-pre_task-rest_bold.json").write_text('{"RepetitionTime": 2.5}')
    return imgs


FILTERS = {"smooth4": {"kind": "gaussian", "fwhm_mm": 4}, "edges": {"kind": "sobel"}, "sharp": {"kind": "sharpen"}}


def run_on_tiny_bids(tmp_path, rng, qc):
    src = tmp_path / "bids"
    make_bids(src, rng)
    out = tmp_path / "deriv"
    config = {"input_dir": str(src), "output_dir": str(out), "suffixes": ["T1w", "bold"], "filters": FILTERS,
              "backend": "cpu", "qc": qc}  # fmt: skip
    snakemake(tmp_path, config)
    return tmp_path, src, out, config


@pytest.fixture
def bids_run(tmp_path, rng):
    return run_on_tiny_bids(tmp_path, rng, qc=False)


def test_bids_derivatives_and_sidecars(bids_run):
    tmp_path, src, out, _ = bids_run
    expected = {
        "sub-01/ses-pre/anat/sub-01_ses-pre_T1w.nii.gz": "sub-01/ses-pre/anat/sub-01_ses-pre_desc-{}_T1w",
        "sub-02/anat/sub-02_T1w.nii.gz": "sub-02/anat/sub-02_desc-{}_T1w",
        "sub-01/ses-pre/func/sub-01_ses-pre_task-rest_bold.nii.gz": "sub-01/ses-pre/func/sub-01_ses-pre_task-rest_desc-{}_bold",
    }
    for rel_in, pattern in expected.items():
        for name, spec in FILTERS.items():
            derived = out / (pattern.format(name) + ".nii.gz")
            params = {k: v for k, v in spec.items() if k != "kind"}
            ref = filter_image(str(src / rel_in), spec["kind"], backend="cpu", **params)
            got = nib.load(derived)
            assert got.get_data_dtype() == np.float32
            assert_allclose(got.get_fdata(), ref.get_fdata(), rtol=1e-6)
            assert_allclose(got.affine, nib.load(src / rel_in).affine)
            meta = json.loads((out / (pattern.format(name) + ".json")).read_text())
            assert meta["Filter"]["kind"] == spec["kind"] and meta["Backend"] == "cpu"
            assert len(meta["InputSHA256"]) == 64
            assert meta["Sources"] == [f"bids:raw:{rel_in}"]
            if rel_in.endswith("_bold.nii.gz"):  # the input's metadata, merged by BIDS inheritance
                assert meta["TaskName"] == "rest" and meta["RepetitionTime"] == 2.5
            else:
                assert "TaskName" not in meta and "RepetitionTime" not in meta
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "volfilter"
    # The bids:raw: URIs resolve through DatasetLinks, relative to the derivatives folder.
    assert (out / desc["DatasetLinks"]["raw"]).resolve() == src.resolve()
    # Only images were treated as inputs: no derivative of the JSON sidecar or README.
    made = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz"))
    assert len(made) == 3 * len(FILTERS)
    # Nothing was written outside output_dir (besides Snakemake's own bookkeeping and the config).
    assert sorted(p.name for p in tmp_path.iterdir()) == [".snakemake", "bids", "config.yaml", "deriv"]


def test_noop_rerun_and_param_change(bids_run):
    tmp_path, src, out, config = bids_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    dry = snakemake(tmp_path, config, "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr
    snakemake(tmp_path, config)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == before
    changed = json.loads(json.dumps(config))
    changed["filters"]["smooth4"]["fwhm_mm"] = 5
    dry = snakemake(tmp_path, changed, "-n")
    assert "filter_volume" in dry.stdout + dry.stderr
    snakemake(tmp_path, changed)
    meta = json.loads((out / "sub-02/anat/sub-02_desc-smooth4_T1w.json").read_text())
    assert meta["Filter"]["fwhm_mm"] == 5
    # Editing an input's sidecar reruns that volume's job, which carries the new metadata.
    (src / "sub-02/anat/sub-02_T1w.json").write_text('{"EchoTime": 0.005}')
    dry = snakemake(tmp_path, changed, "-n")
    assert "filter_volume" in dry.stdout + dry.stderr
    snakemake(tmp_path, changed)
    assert json.loads((out / "sub-02/anat/sub-02_desc-edges_T1w.json").read_text())["EchoTime"] == 0.005


def test_groups_of_volumes_per_job_give_the_same_bytes(bids_run):
    """volumes_per_job: 2 runs 2 jobs for 3 volumes, one process each, with byte-identical outputs."""
    tmp_path, src, out, config = bids_run
    grouped = {**config, "output_dir": str(tmp_path / "grouped"), "volumes_per_job": 2}
    proc = snakemake(tmp_path, grouped)
    assert (
        "filter_volumes_0" in proc.stderr and "filter_volumes_1" in proc.stderr and "filter_volume " not in proc.stderr
    )
    made = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_desc-*") if "logs" not in p.parts)
    assert len(made) == 2 * 3 * len(FILTERS)
    for rel in made:
        assert_same_bytes(tmp_path / "grouped" / rel, out / rel)
    dry = snakemake(tmp_path, grouped, "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr


def test_masks_from_a_pattern(tmp_path, rng):
    """config mask with {base}: each volume filtered within its own mask; a missing one stops the run."""
    src = tmp_path / "bids"
    imgs = make_bids(src, rng)
    masks = tmp_path / "masks"
    pattern = str(masks / "{base}_desc-brain_mask.nii.gz")
    for rel, data in imgs.items():
        vol = parse_bids_path(rel, str(src))
        path = Path(pattern.format(base=vol.base))
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(
            nib.Nifti1Image((rng.random(data.shape[:3]) > 0.3).astype(np.uint8), np.diag([1.0, 1.2, 2.0, 1.0])), path
        )
    out = tmp_path / "deriv"
    config = {"input_dir": str(src), "output_dir": str(out), "suffixes": ["T1w", "bold"], "mask": pattern,
              "filters": {"s4": {"kind": "gaussian", "fwhm_mm": 4}}, "backend": "cpu", "qc": False}  # fmt: skip
    snakemake(tmp_path, config)
    for rel in imgs:
        vol = parse_bids_path(rel, str(src))
        mask_path = pattern.format(base=vol.base)
        got = nib.load(out / vol.derivative("s4")).get_fdata()
        ref = filter_image(str(src / rel), "gaussian", fwhm_mm=4, mask=mask_path, backend="cpu").get_fdata()
        assert_allclose(got, ref, rtol=1e-6)
        inside = nib.load(mask_path).get_fdata() > 0
        assert np.all(got[~inside] == 0) and np.all(got[inside] != 0)
        meta = json.loads((out / vol.derivative("s4", ".json")).read_text())
        assert meta["Mask"]["file"] == os.path.basename(mask_path) and len(meta["Mask"]["SHA256"]) == 64
    os.remove(pattern.format(base="sub-02/anat/sub-02"))
    config["output_dir"] = str(tmp_path / "deriv2")
    proc = snakemake(tmp_path, config, check=False)
    assert proc.returncode != 0 and "sub-02_desc-brain_mask.nii.gz" in proc.stderr + proc.stdout
    assert not (tmp_path / "deriv2").exists() or not list((tmp_path / "deriv2").rglob("*.nii.gz"))


def test_plain_folder(tmp_path, rng):
    src = tmp_path / "plain"
    src.mkdir()
    names = ["a.nii.gz", "with space.nii", "süb.nii.gz"]
    for n in names:
        nib.save(nib.Nifti1Image(rng.random((6, 7, 5)).astype(np.float32), np.eye(4)), src / n)
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    snakemake(tmp_path, {"input_dir": str(src), "output_dir": str(out), "filters": {"b": {"kind": "box"}}, "qc": False})
    made = sorted(p.name for p in out.glob("*.nii.gz"))
    assert made == ["a_desc-b.nii.gz", "süb_desc-b.nii.gz", "with space_desc-b.nii.gz"]
    ref = filter_image(str(src / "with space.nii"), "box", backend="cpu")
    assert_allclose(nib.load(out / "with space_desc-b.nii.gz").get_fdata(), ref.get_fdata(), rtol=1e-6)


def test_uncompressed_outputs(tmp_path, rng):
    """compress: false writes .nii (raw NIfTI bytes, no gzip) with the same data, sidecars and QC."""
    src = tmp_path / "plain"
    src.mkdir()
    nib.save(nib.Nifti1Image(rng.random((9, 8, 7)).astype(np.float32), np.diag([1.0, 1.5, 2.0, 1.0])), src / "a.nii.gz")
    out = tmp_path / "out"
    config = {"input_dir": str(src), "output_dir": str(out), "filters": FILTERS, "compress": False, "qc": True}
    snakemake(tmp_path, config)
    made = sorted(p.name for p in out.glob("a_desc-*"))
    assert made == [f"a_desc-{n}.{e}" for n in sorted(FILTERS) for e in ("json", "nii")]
    for name, spec in FILTERS.items():
        path = out / f"a_desc-{name}.nii"
        assert path.read_bytes()[344:348] == b"n+1\0"  # a single-file NIfTI-1, not gzip
        ref = filter_image(
            str(src / "a.nii.gz"), spec["kind"], backend="cpu", **{k: v for k, v in spec.items() if k != "kind"}
        )
        assert_allclose(nib.load(path).get_fdata(), ref.get_fdata(), rtol=1e-6, atol=1e-6)
    assert (out / "qc" / "a_desc-smooth4_qc.png").stat().st_size > 0
    assert not list(out.glob("*.nii.gz"))


def test_path_traversal_names_cannot_escape(tmp_path, rng):
    src = tmp_path / "bids"
    make_bids(src, rng)
    evil = src / "sub-01" / "ses-pre" / "anat" / "sub-01_ses-pre_acq-..%2F..%2Fx_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), evil)
    (src / "sub-..").mkdir()
    out = tmp_path / "nested" / "out"
    proc = snakemake(
        tmp_path, {"input_dir": str(src), "output_dir": str(out), "filters": {"i": {"kind": "identity"}}, "qc": False}
    )
    assert "skipped sub-01/ses-pre/anat/sub-01_ses-pre_acq-..%2F..%2Fx_T1w.nii.gz" in proc.stderr
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents and src not in p.parents
               and ".snakemake" not in p.parts and p.name != "config.yaml"]  # fmt: skip
    assert outside == []
    assert len(list(out.rglob("*_desc-i_T1w.nii.gz"))) == 2


@pytest.mark.parametrize(
    "patch,key",
    [
        ({"filters": {"x": {"kind": "wobble"}}}, "kind"),
        ({"filters": {"x": {"kind": "gaussian", "fwhm_mm": -6}}}, "fwhm_mm"),
        ({"filters": {"bad-name": {"kind": "sobel"}}}, "bad-name"),
        ({"input_dir": None}, "input_dir"),
        ({"input_dir": "/nonexistent/folder"}, "input_dir"),
        ({"backend": "tpu"}, "backend"),
        ({"mask": "/masks/{nope}_mask.nii.gz"}, "mask"),
        ({"volumes_per_job": 0}, "volumes_per_job"),
    ],
)
def test_bad_config_fails_before_any_job(tmp_path, patch, key):
    config = {"input_dir": "example", "output_dir": str(tmp_path / "out"), "filters": {"s": {"kind": "identity"}}}
    for k, v in patch.items():
        if v is None:
            config.pop(k)
        else:
            config[k] = v
    proc = snakemake(tmp_path, config, check=False)
    assert proc.returncode != 0
    assert key in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "resources").exists()


def test_bundled_example_config_runs(tmp_path):
    """The repository's own config (input_dir: example) in a scratch working directory."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["output_dir"] = "deriv"
    config["qc"] = False
    config["backend"] = "cpu"
    snakemake(tmp_path, config)
    assert (tmp_path / "deriv/sub-01/func/sub-01_task-rest_desc-smooth6_bold.nii.gz").exists()
    assert nib.load(tmp_path / "deriv/sub-02/anat/sub-02_desc-edges_T1w.nii.gz").shape == (21, 26, 22)
    assert os.path.exists(tmp_path / "resources/example_bids/participants.tsv")


def test_qc_outputs_and_report(tmp_path, rng):
    _, _, out, config = run_on_tiny_bids(tmp_path, rng, qc=True)
    pngs = sorted(p.relative_to(out).as_posix() for p in (out / "qc").rglob("*_qc.png"))
    assert len(pngs) == 3 * len(FILTERS)
    assert "qc/sub-01/ses-pre/anat/sub-01_ses-pre_desc-smooth4_T1w_qc.png" in pngs
    table = (out / "qc" / "group_metrics.tsv").read_text().splitlines()
    header = table[0].split("\t")
    assert len(table) == 1 + 3 * len(FILTERS)
    assert {"in_fwhm_x_mm", "out_fwhm_x_mm", "out_nan_count", "volume", "filter"} <= set(header)
    snakemake(tmp_path, config, "--report", str(tmp_path / "report.html"))
    html = (tmp_path / "report.html").read_text()
    assert "group_smoothness.png" in html and "sub-02_desc-edges_T1w_qc.png" in html
    assert "group_metrics.tsv" in html  # the study table too


def test_volumes_json_too_long_for_one_command_line_is_a_config_error():
    from pipeline import VolfilterError
    from pipeline.bids import InputVolume
    from pipeline.workflow import MAX_COMMAND_JSON, volumes_json

    vol = InputVolume(path="/data/" + "x" * 200 + ".nii.gz", base="x" * 200, suffix="")
    one = len(volumes_json([vol], ["a", "b", "c"], "/out", ".nii.gz", {}))
    fits = MAX_COMMAND_JSON // (one + 1)
    assert len(volumes_json([vol] * fits, ["a", "b", "c"], "/out", ".nii.gz", {})) <= MAX_COMMAND_JSON
    with pytest.raises(VolfilterError, match="volumes_per_job"):
        volumes_json([vol] * (fits + 5), ["a", "b", "c"], "/out", ".nii.gz", {})


@pytest.mark.parametrize(
    ("backend", "extra", "threads"),
    [
        ("cpu", [], 1),
        ("gpu", ["-c16"], 8),
        ("gpu", ["-c3"], 3),
        ("gpu", ["-c16", "--config", "gpu_threads=4"], 4),
        ("gpu", ["-c16", "--config", "volumes_per_job=2"], 8),
    ],
)
def test_gpu_filter_jobs_get_gpu_threads_capped_at_cores(tmp_path, rng, backend, extra, threads):
    """GPU jobs run one at a time per GPU: their host-side gzip gets gpu_threads, capped at --cores."""
    src = tmp_path / "bids"
    make_bids(src, rng)
    config = {"input_dir": str(src), "output_dir": str(tmp_path / "deriv"), "suffixes": ["T1w"], "filters": FILTERS,
              "backend": backend, "qc": False}  # fmt: skip
    dry = snakemake(tmp_path, config, "-n", "-p", *extra)
    commands = [line for line in dry.stdout.splitlines() if " batch " in line]
    assert len(commands) == (1 if "volumes_per_job=2" in extra else 2), dry.stdout
    assert all(f"--threads {threads} " in line for line in commands), commands
