"""The volfilter CLI: outputs, sidecars, and one-line errors that write nothing."""

import json
import os
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import assert_same_bytes, digest
from numpy.testing import assert_allclose

from pipeline import filter_image
from pipeline.cli import main


def run_cli(capsys, *args):
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc, err, fragment):
    assert rc != 0
    assert err.startswith("volfilter: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert fragment.lower() in err.lower(), err


def test_apply_writes_volume_and_sidecar(nib_data, tmp_path, capsys):
    out = tmp_path / "smooth.nii.gz"
    rc, _, err = run_cli(
        capsys, "apply", nib_data("anatomical.nii"), out, "--filter", "gaussian", "--fwhm-mm", 6, "--backend", "cpu"
    )
    assert rc == 0, err
    expected = filter_image(nib_data("anatomical.nii"), "gaussian", fwhm_mm=6, backend="cpu")
    assert_allclose(nib.load(out).get_fdata(), expected.get_fdata(), rtol=1e-6)
    meta = json.loads((tmp_path / "smooth.json").read_text())
    assert meta["Filter"] == {"kind": "gaussian", "fwhm_mm": 6.0}
    assert meta["InputSHA256"] == digest(nib_data("anatomical.nii"))
    assert meta["Backend"] == "cpu" and "nibabel" in meta["SoftwareVersions"]


_SOURCE_AND_KERNELS = (
    "from pipeline import provenance as p; v = p.versions('cpu'); print(v['volfilter_source_sha256'], v['cpu_kernels'])"
)


def test_sidecar_names_the_exact_code_and_the_cpu_implementation(nib_data, tmp_path):
    """The source fingerprint is the same in another process, and changes with any edit of the code;
    the sidecar says whether the compiled kernels or scipy.ndimage ran (VOLFILTER_NO_NATIVE)."""
    import shutil

    from pipeline.backend import cpu_kernels

    def run(pkg_parent, **env):
        env = {**os.environ, "PYTHONPATH": str(pkg_parent), **env}
        return subprocess.run([sys.executable, "-c", _SOURCE_AND_KERNELS], env=env, check=True,
                              capture_output=True, text=True, cwd=tmp_path).stdout.split(maxsplit=1)  # fmt: skip

    here = pathlib.Path(__file__).resolve().parents[1]
    original, kernels = run(here)
    assert kernels.strip() == ("scipy.ndimage" if cpu_kernels() is None else "compiled (pipeline/_native.c)")
    assert run(here, VOLFILTER_NO_NATIVE="1") == [original, "scipy.ndimage\n"]
    copy = tmp_path / "copy"
    shutil.copytree(here / "pipeline", copy / "pipeline", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    assert run(copy, VOLFILTER_NO_NATIVE="1")[0] == original  # the same code elsewhere
    with open(copy / "pipeline" / "filters.py", "a") as fh:
        fh.write("# an edit\n")
    assert run(copy, VOLFILTER_NO_NATIVE="1")[0] != original

    out = tmp_path / "e.nii.gz"
    subprocess.run([sys.executable, "-m", "pipeline", "apply", nib_data("anatomical.nii"), str(out), "--filter", "sobel"],
                   env={**os.environ, "VOLFILTER_NO_NATIVE": "1"}, check=True, capture_output=True)  # fmt: skip
    meta = json.loads((tmp_path / "e.json").read_text())["SoftwareVersions"]
    assert (meta["volfilter_source_sha256"], meta["cpu_kernels"]) == (original, "scipy.ndimage")


def test_batch_applies_several_filters_on_one_load(nib_data, tmp_path, capsys):
    spec = {"s6": {"kind": "gaussian", "fwhm_mm": 6}, "edges": {"kind": "sobel"}}
    rc, _, err = run_cli(capsys, "batch", nib_data("example4d.nii.gz"), "--filters-json", json.dumps(spec),
                         "--output", f"s6={tmp_path / 's6.nii.gz'}", "--output", f"edges={tmp_path / 'e.nii'}")  # fmt: skip
    assert rc == 0, err
    assert nib.load(tmp_path / "s6.nii.gz").shape == (128, 96, 24, 2)
    ref = filter_image(nib_data("example4d.nii.gz"), "sobel", backend="cpu")
    assert_allclose(nib.load(tmp_path / "e.nii").get_fdata(), ref.get_fdata(), rtol=1e-6)


def test_mask_option(tmp_path, write_nifti, capsys):
    data = np.full((10, 10, 10), 100.0, np.float32)
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[2:8, 2:8, 2:8] = 1
    data[mask == 1] = 5.0
    src = write_nifti(data, "in.nii.gz")
    m = write_nifti(mask, "mask.nii.gz")
    rc, _, err = run_cli(capsys, "apply", src, tmp_path / "o.nii.gz", "--filter", "box", "--mask", m)
    assert rc == 0, err
    out = nib.load(tmp_path / "o.nii.gz").get_fdata()
    assert_allclose(out[mask == 1], 5.0, rtol=1e-6)
    assert (out[mask == 0] == 0).all()


def test_filters_lists_every_filter(capsys):
    from pipeline.filters import FILTERS

    rc, out, _ = run_cli(capsys, "filters")
    assert rc == 0
    for name in FILTERS:
        assert name in out
    assert "--fwhm-mm" in out and "--kernel-file" in out


def test_output_same_as_input_refused(nib_data, tmp_path, capsys):
    src = tmp_path / "a.nii.gz"
    src.write_bytes(pathlib.Path(nib_data("example4d.nii.gz")).read_bytes())
    before = digest(src)
    rc, _, err = run_cli(capsys, "apply", src, src, "--filter", "identity")
    assert_one_line_error(rc, err, "overwrite the input")
    assert digest(src) == before


def test_unwritable_output_folder(nib_data, tmp_path, capsys):
    rc, _, err = run_cli(
        capsys, "apply", nib_data("anatomical.nii"), tmp_path / "no" / "dir" / "o.nii.gz", "--filter", "identity"
    )
    assert_one_line_error(rc, err, "does not exist")
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        rc, _, err = run_cli(capsys, "apply", nib_data("anatomical.nii"), locked / "o.nii.gz", "--filter", "identity")
        assert_one_line_error(rc, err, "cannot write")


def test_gpu_requested_without_gpu_is_one_line(nib_data, tmp_path, capsys, monkeypatch):
    from pipeline import backend

    monkeypatch.setattr(backend, "gpu_available", lambda: False)
    rc, _, err = run_cli(
        capsys, "apply", nib_data("anatomical.nii"), tmp_path / "o.nii.gz", "--filter", "identity", "--backend", "gpu"
    )
    assert_one_line_error(rc, err, "CuPy")
    assert os.listdir(tmp_path) == []


def test_console_script_prints_no_traceback(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + os.urandom(100))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "apply", str(bad), str(tmp_path / "o.nii.gz"), "--filter", "identity"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("volfilter: error:"), proc.stderr
    assert not (tmp_path / "o.nii.gz").exists()


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and "volfilter" in capsys.readouterr().out
    for cmd in (["--help"], ["apply", "--help"], ["batch", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(cmd)
        assert exc.value.code == 0


def test_warning_is_one_line_and_the_output_is_written(tmp_path, capsys):
    sheared = np.eye(4)
    sheared[0, 2] = 0.5
    nib.Nifti1Image(np.ones((6, 6, 6), np.float32), sheared).to_filename(tmp_path / "sheared.nii")
    rc, _, err = run_cli(capsys, "apply", tmp_path / "sheared.nii", tmp_path / "out.nii", "--filter", "gaussian",
                         "--fwhm-mm", 2, "--backend", "cpu")  # fmt: skip
    assert rc == 0, err
    assert err.startswith("volfilter: warning: ") and err.count("\n") == 1 and "sheared" in err, err
    assert (tmp_path / "out.nii").exists()


def test_bids_root_sidecar_and_bad_metadata_writes_nothing(tmp_path, capsys):
    root = tmp_path / "bids"
    (root / "sub-01/func").mkdir(parents=True)
    src = root / "sub-01/func/sub-01_task-rest_bold.nii.gz"
    nib.Nifti1Image(np.ones((6, 6, 6, 2), np.float32), np.eye(4)).to_filename(src)
    (root / "task-rest_bold.json").write_text('{"TaskName": "rest", "RepetitionTime": 2.0}')
    out = tmp_path / "sub-01_task-rest_desc-s_bold.nii.gz"
    rc, _, err = run_cli(capsys, "apply", src, out, "--filter", "gaussian", "--fwhm-mm", 2, "--bids-root", root)
    assert rc == 0, err
    meta = json.loads((tmp_path / "sub-01_task-rest_desc-s_bold.json").read_text())
    assert meta["TaskName"] == "rest" and meta["RepetitionTime"] == 2.0
    assert meta["Sources"] == ["bids:raw:sub-01/func/sub-01_task-rest_bold.nii.gz"]
    (root / "task-rest_bold.json").write_text('{"TaskName": ')
    out2 = tmp_path / "again.nii.gz"
    rc, _, err = run_cli(capsys, "apply", src, out2, "--filter", "gaussian", "--fwhm-mm", 2, "--bids-root", root)
    assert_one_line_error(rc, err, "task-rest_bold.json: not a readable JSON sidecar")
    assert not out2.exists() and not (tmp_path / "again.json").exists()


def test_batch_of_volumes_in_one_process_equals_one_process_each(tmp_path, capsys, rng):
    specs = {"s": {"kind": "gaussian", "fwhm_mm": 3}, "e": {"kind": "sobel"}}
    inputs = []
    for i, shape in enumerate([(9, 8, 7), (6, 7, 8, 3)]):
        path = tmp_path / f"in{i}.nii.gz"
        nib.Nifti1Image(rng.normal(size=shape).astype(np.float32), np.diag([1.0, 1.5, 2.0, 1])).to_filename(path)
        inputs.append(path)
    mask = tmp_path / "mask.nii"
    nib.Nifti1Image((rng.random((9, 8, 7)) > 0.4).astype(np.uint8), np.diag([1.0, 1.5, 2.0, 1])).to_filename(mask)
    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir(), many.mkdir()
    for i, src in enumerate(inputs):
        extra = ["--mask", mask] if i == 0 else []
        rc, _, err = run_cli(capsys, "batch", src, "--filters-json", json.dumps(specs), *extra,
                             *[f"--output={n}={one}/{n}{i}.nii.gz" for n in specs])  # fmt: skip
        assert rc == 0, err
    volumes = [
        {"input": str(src), "outputs": {n: f"{many}/{n}{i}.nii.gz" for n in specs}} for i, src in enumerate(inputs)
    ]
    volumes[0]["mask"] = str(mask)
    rc, _, err = run_cli(capsys, "batch", "--filters-json", json.dumps(specs), "--volumes-json", json.dumps(volumes))
    assert rc == 0, err
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in many.iterdir()) and len(names) == 8  # 4 volumes, 4 sidecars
    for name in names:
        assert_same_bytes(one / name, many / name)


def test_batch_of_volumes_checks_everything_before_writing(tmp_path, capsys, rng):
    src = tmp_path / "a.nii.gz"
    nib.Nifti1Image(rng.normal(size=(5, 5, 5)).astype(np.float32), np.eye(4)).to_filename(src)
    specs = json.dumps({"s": {"kind": "gaussian", "fwhm_mm": 3}})

    def batch(*volumes):
        return run_cli(capsys, "batch", "--filters-json", specs, "--volumes-json", json.dumps(list(volumes)))

    first = {"input": str(src), "outputs": {"s": str(tmp_path / "o1.nii.gz")}}
    rc, _, err = batch(
        first, {"input": str(tmp_path / "missing.nii.gz"), "outputs": {"s": str(tmp_path / "o2.nii.gz")}}
    )
    assert_one_line_error(rc, err, "missing.nii.gz: no such file")
    rc, _, err = batch(first, {"input": str(src), "outputs": {"s": str(tmp_path / "o1.nii.gz")}})
    assert_one_line_error(rc, err, "named twice as an output")
    other = tmp_path / "b.nii.gz"
    other.write_bytes(src.read_bytes())
    rc, _, err = batch(first, {"input": str(other), "outputs": {"s": str(src)}})
    assert_one_line_error(rc, err, "also an output of this batch")
    rc, _, err = batch({"input": str(src), "outputs": {"t": str(tmp_path / "o3.nii.gz")}})
    assert_one_line_error(rc, err, "no filter named 't'")
    rc, _, err = run_cli(capsys, "batch", src, "--filters-json", specs, "--volumes-json", json.dumps([first]))
    assert_one_line_error(rc, err, "not both")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.nii.gz"]
