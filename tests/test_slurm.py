"""The workflow through a real single-node SLURM cluster, with the repository's profile.

Skipped, with the reason printed, when SLURM cannot be started here (not installed, not root).
"""

import re
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import slurm_cluster
import yaml
from conftest import assert_same_bytes
from slurm_cluster import local_cluster, unavailable_reason
from test_workflow import REPO, snakemake

pytestmark = pytest.mark.slurm

FILTERS = {"s": {"kind": "gaussian", "fwhm_mm": 4}, "e": {"kind": "sobel"}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        print(f"\nSKIPPING SLURM test: {reason}", file=sys.stderr)
        pytest.skip(reason)
    with local_cluster(tmp_path_factory.mktemp("slurm")) as env:
        yield env


def test_workflow_through_slurm_equals_local_run(cluster, tmp_path, rng):
    src = tmp_path / "bids"
    for sub in ("01", "02", "03"):
        p = src / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz"
        p.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(rng.normal(100, 10, (20, 22, 18)).astype(np.float32), np.diag([1, 1, 2, 1])), p)
    (src / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.10.0"}')
    cfg = {"input_dir": str(src), "filters": FILTERS, "backend": "cpu", "qc": False}
    local, remote = tmp_path / "local", tmp_path / "slurm"
    local.mkdir()
    remote.mkdir()
    snakemake(local, {**cfg, "output_dir": str(local / "out")})

    (remote / "config.yaml").write_text(yaml.safe_dump({**cfg, "output_dir": str(remote / "out")}))
    cmd = ["timeout", "-s", "KILL", "240", sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
           "--directory", str(remote), "--configfile", str(remote / "config.yaml"),
           "--profile", str(REPO / "profiles" / "slurm"),
           "--slurm-status-command", "squeue", "--slurm-no-account", "--slurm-init-seconds-before-status-checks", "2",
           "--default-resources", "slurm_partition=debug", "mem_mb=500", "runtime=10",
           "--group-components", "filter=2", "--cores", "2", "--slurm-keep-successful-logs", "--latency-wait", "5"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=remote, env=cluster, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    outs = sorted(p.relative_to(local / "out") for p in (local / "out").rglob("*") if p.suffix in (".gz", ".json"))
    assert len(outs) == 3 * 2 * len(FILTERS) + 1
    for rel in outs:
        assert_same_bytes(remote / "out" / rel, local / "out" / rel)

    # The filter jobs really went through SLURM, grouped: 3 volumes -> 2 cluster jobs (2 + 1).
    job_ids = set(re.findall(r"SLURM jobid (\d+)", log)) | set(re.findall(r"external jobid '?(\d+)", log))
    assert len(job_ids) == 2, log[-4000:]
    slurm_logs = list((remote / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert len(slurm_logs) == 2
    assert all(any(jid in p.name or jid in p.read_text(errors="replace") for p in slurm_logs) for jid in job_ids)


def test_a_second_test_suite_waits_for_the_first_ones_cluster(tmp_path, monkeypatch):
    """Two suites at once on one machine (two clones) would both take /etc/slurm/slurm.conf and
    SLURM's ports: the cluster is held under a machine-wide lock that the other one waits for."""
    monkeypatch.setattr(slurm_cluster, "LOCK", str(tmp_path / "slurm.lock"))
    holder = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); import slurm_cluster as s; s.LOCK = sys.argv[2]\n"
        "with s._machine_lock(5):\n    print('held', flush=True); time.sleep(3)"
    )
    other = subprocess.Popen([sys.executable, "-c", holder, str(REPO / "tests"), slurm_cluster.LOCK],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert other.stdout.readline().strip() == "held"
    held_at = time.monotonic()
    with pytest.raises(RuntimeError, match="another test suite held"):
        with slurm_cluster._machine_lock(0.5):
            pass
    with slurm_cluster._machine_lock(30):
        assert time.monotonic() - held_at > 2.5  # ours only once the other process let go (after 3 s)
    assert other.wait() == 0
