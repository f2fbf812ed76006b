"""Interruptions, determinism and bad subjects in a workflow run."""

import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import assert_same_bytes, digest, why_gzip_differs
from test_workflow import REPO, snakemake

from pipeline.cli import main
from pipeline.io import TMP_SUFFIX


@pytest.fixture
def big_input(tmp_path, rng):
    data = rng.normal(100, 20, (160, 160, 120)).astype(np.float32)
    path = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.2, 1.0])), path)
    return path


def test_kill_9_mid_run_never_leaves_a_truncated_output(big_input, tmp_path):
    out = tmp_path / "out" / "o.nii.gz"
    out.parent.mkdir()
    cmd = [sys.executable, "-m", "pipeline", "apply", str(big_input), str(out), "--filter", "gaussian", "--fwhm-mm", "3",
           "--no-sidecar", "--backend", "cpu"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    full = time.perf_counter() - t
    reference = digest(out)
    first = tmp_path / "first.nii.gz"
    out.rename(first)  # kept for the message below (and in tmp_path) should a rerun differ
    outcomes = set()
    for frac in (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
        proc = subprocess.Popen(cmd, env=env)
        time.sleep(full * frac)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():  # only ever the complete result
            assert digest(out) == reference, why_gzip_differs(first.read_bytes(), out.read_bytes())
            outcomes.add("complete")
            out.unlink()
        else:
            outcomes.add("absent")
    assert "absent" in outcomes
    subprocess.run(cmd, check=True, env=env)  # a clean rerun also removes temporaries of killed runs
    assert digest(out) == reference, why_gzip_differs(first.read_bytes(), out.read_bytes())
    assert [n for n in os.listdir(out.parent) if TMP_SUFFIX in n] == []


def test_reruns_are_byte_identical(nib_data, tmp_path, capsys):
    outs = []
    for i in range(2):
        o = tmp_path / f"run{i}" / "o.nii.gz"
        o.parent.mkdir()
        assert main(["apply", nib_data("example4d.nii.gz"), str(o), "--filter", "unsharp", "--backend", "cpu"]) == 0
        outs.append(o)
    assert_same_bytes(*outs)
    assert_same_bytes(*(o.with_suffix("").with_suffix(".json") for o in outs))


def _bids(root, rng, n=2, shape=(96, 96, 80)):
    for i in range(1, n + 1):
        p = root / f"sub-{i:02d}" / "anat" / f"sub-{i:02d}_T1w.nii.gz"
        p.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(rng.normal(100, 10, shape).astype(np.float32), np.eye(4)), p)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.10.0"}')


FILTERS = {"s": {"kind": "gaussian", "fwhm_mm": 4}, "e": {"kind": "sobel"}, "h": {"kind": "sharpen"}}


def test_snakemake_kill_9_then_rerun_equals_uninterrupted(tmp_path, rng):
    src = tmp_path / "bids"
    _bids(src, rng)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    for d in (ref_dir, run_dir):
        d.mkdir()
    cfg = {"input_dir": str(src), "filters": FILTERS, "backend": "cpu", "qc": False}
    snakemake(ref_dir, {**cfg, "output_dir": str(ref_dir / "out")})

    (run_dir / "config.yaml").write_text(yaml.safe_dump({**cfg, "output_dir": str(run_dir / "out")}))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(run_dir),
           "--configfile", str(run_dir / "config.yaml"), "-c1"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=run_dir, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    logs = run_dir / "out" / "logs" / "filter"
    deadline = time.time() + 60
    while not (logs.exists() and list(logs.rglob("*.log"))) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # inside the first filter job
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list((run_dir / "out").rglob("*_desc-*.nii.gz"))
    assert len(done) < 2 * len(FILTERS), "killed too late: the run had finished"
    proc = subprocess.run(cmd, cwd=run_dir, capture_output=True, text=True)  # the same command again
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref_files = sorted(
        p.relative_to(ref_dir / "out") for p in (ref_dir / "out").rglob("*") if p.suffix in (".gz", ".json")
    )
    assert len(ref_files) == 2 * 2 * len(FILTERS) + 1
    for rel in ref_files:
        assert_same_bytes(run_dir / "out" / rel, ref_dir / "out" / rel)


def test_bad_subject_fails_alone_with_message_in_its_log(tmp_path, rng):
    src = tmp_path / "bids"
    _bids(src, rng, n=3, shape=(12, 12, 10))
    bad = src / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file at all" * 10)
    out = tmp_path / "out"
    proc = snakemake(
        tmp_path, {"input_dir": str(src), "output_dir": str(out), "filters": FILTERS, "qc": False}, check=False
    )
    assert proc.returncode != 0
    for good in ("sub-01", "sub-03"):
        assert (out / good / "anat" / f"{good}_desc-s_T1w.nii.gz").exists()
    assert not list((out / "sub-02").rglob("*.nii.gz")) if (out / "sub-02").exists() else True
    log = (out / "logs" / "filter" / "sub-02" / "anat" / "sub-02_T1w.log").read_text()
    assert log.strip().splitlines() == [
        f"volfilter: error: {bad}: named .gz but not gzip-compressed; rename it to end in .nii"
    ]
