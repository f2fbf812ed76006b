import os
import shlex
import sys

from snakemake.utils import validate
from snakemake_interface_executor_plugins.settings import DeploymentMethod

sys.path.insert(0, workflow.basedir)  # the pipeline package of this very checkout

from pipeline import VolfilterError
from pipeline import workflow as wf
from pipeline.example import EXAMPLE_FILES, EXAMPLE_SIDECARS

_own_filters = wf.filters_from_configfiles(workflow.config_settings.configfiles)
if _own_filters is not None:
    config["filters"] = _own_filters  # a study's filter set replaces the defaults, not merged into them

validate(config, schema="../config/schema.yaml")
try:
    FILTERS_JSON = wf.filters_json(config["filters"])
    VOLUMES, SKIPPED = wf.find_inputs(config, os.path.join("resources", "example_bids"))
    MASKS = {v.key: wf.mask_for(config, v) for v in VOLUMES}
except VolfilterError as exc:
    raise WorkflowError(f"invalid config: {exc}")

for message in SKIPPED:
    print(f"volfilter: skipped {message}", file=sys.stderr)

OUT = config["output_dir"]
EXAMPLE_DIR = os.path.join("resources", "example_bids")
FILTER_NAMES = sorted(config["filters"])
KERNEL_FILES = wf.kernel_files(config["filters"])
BY_KEY = {v.key: v for v in VOLUMES}
GPU_REQUEST = 1 if config["backend"] == "gpu" else 0
# CPU jobs: one thread each (measured in bench/NOTES.md, "Threads"). GPU jobs run one at a time per GPU: give their
# host-side gzip the cores that the other jobs' count would have used.
FILTER_THREADS = config["gpu_threads"] if GPU_REQUEST else 1
NII = ".nii.gz" if config["compress"] else ".nii"  # the derived volumes' extension
VOLUMES_PER_JOB = config["volumes_per_job"]
CHUNKS = wf.chunks(VOLUMES, VOLUMES_PER_JOB)
try:
    CHUNK_JSON = [wf.volumes_json(c, FILTER_NAMES, OUT, NII, MASKS) for c in CHUNKS] if VOLUMES_PER_JOB > 1 else []
except VolfilterError as exc:
    raise WorkflowError(f"invalid config: {exc}")


def _cli():
    """The volfilter CLI of this checkout, run by the job's Python (a conda env's with --sdm conda).

    OPENBLAS_NUM_THREADS=1: the jobs do no BLAS work worth threads, and OpenBLAS's worker threads,
    started when NumPy is imported, spin before they sleep (0.10 s of CPU on the 2-core VM). Two 256^3 jobs at
    once on the 2-core VM (as snakemake -c2 runs them), 9 alternated pairs: paired ratios 0.92 and
    0.93; a 200-volume EPI job, long enough for it not to show: 1.03 (noise).
    """
    uses_conda = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
    python = "python" if uses_conda else shlex.quote(sys.executable)
    return f"PYTHONPATH={shlex.quote(workflow.basedir)} OPENBLAS_NUM_THREADS=1 {python} -m pipeline"


VOLFILTER = _cli()


wildcard_constraints:
    base=r".+",
    suffix=r"(_[A-Za-z0-9]+)?",
    name=r"[A-Za-z0-9]+",


def volume(wildcards):
    key = wildcards.base + wildcards.suffix
    if key not in BY_KEY:
        raise WorkflowError(f"no input volume for {key!r}")
    return BY_KEY[key]


def input_image(wildcards):
    return volume(wildcards).path


def mask_input(wildcards):
    """The volume's mask (config key mask), if any: a missing one stops the run before any job."""
    mask = MASKS[volume(wildcards).key]
    return [mask] if mask else []


def mask_arg(wildcards):
    mask = MASKS[volume(wildcards).key]
    return shlex.quote(f"--mask={mask}") if mask else ""


def bids_root_option(root):
    """--bids-root for volumes of a BIDS dataset (their sidecars then carry the input's metadata)."""
    return shlex.quote(f"--bids-root={root}") if root else ""


def bids_root_arg(wildcards):
    return bids_root_option(volume(wildcards).root)


def input_sidecars(wildcards):
    """The input's BIDS JSON sidecars: editing one reruns its volume's filter job."""
    return wf.metadata_files(volume(wildcards), config["input_dir"] == wf.EXAMPLE)


SOURCE_ROOTS = sorted({v.root for v in VOLUMES if v.root})


# With volumes_per_job > 1: one job filters a group of volumes in one process (rules/filter.smk).
def chunk_outputs(chunk, ext):
    return [os.path.join(OUT, v.derivative(n, ext)) for v in chunk for n in FILTER_NAMES]


def chunk_extra_inputs(chunk):
    """The group's BIDS sidecars and masks (editing one reruns the group)."""
    example = config["input_dir"] == wf.EXAMPLE
    paths = [p for v in chunk for p in wf.metadata_files(v, example)] + [MASKS[v.key] for v in chunk if MASKS[v.key]]
    return list(dict.fromkeys(paths))  # one top-level sidecar or one mask can serve several volumes


def chunk_mem_mb(chunk):
    def mem_mb(wildcards, attempt):
        return max(wf.mem_mb(v.path, attempt) for v in chunk)

    return mem_mb


def chunk_runtime(chunk):
    def runtime(wildcards, attempt):
        return sum(wf.runtime_min(v.path, len(FILTER_NAMES), attempt) for v in chunk)

    return runtime


def example_root(wildcards, output):
    first = next(iter(EXAMPLE_FILES))
    return output[0][: -len(os.path.join(*first.split("/")))].rstrip(os.sep)


def output_args(wildcards, output):
    return " ".join(shlex.quote(f"--output={name}={path}") for name, path in zip(FILTER_NAMES, output.volumes))


def qc_args(wildcards, input, output):
    pairs = [f"--derived={n}={p}" for n, p in zip(FILTER_NAMES, input.volumes)]
    pairs += [f"--png={n}={p}" for n, p in zip(FILTER_NAMES, output.pngs)]
    return " ".join(shlex.quote(p) for p in pairs)


def qc_outputs():
    pngs = [os.path.join(OUT, "qc", v.derivative(n, "_qc.png")) for v in VOLUMES for n in FILTER_NAMES]
    return pngs + [os.path.join(OUT, "qc", "group_metrics.tsv"), os.path.join(OUT, "qc", "group_smoothness.png")]


def filter_mem_mb(wildcards, attempt):
    return wf.mem_mb(input_image(wildcards), attempt)


def qc_mem_mb(wildcards, attempt):
    return wf.qc_mem_mb(input_image(wildcards), attempt)


def filter_runtime(wildcards, attempt):
    return wf.runtime_min(input_image(wildcards), len(FILTER_NAMES), attempt)


def derivative_paths(ext):
    return [os.path.join(OUT, v.derivative(n, ext)) for v in VOLUMES for n in FILTER_NAMES]


def all_outputs():
    outputs = derivative_paths(NII) + derivative_paths(".json")
    outputs.append(os.path.join(OUT, "dataset_description.json"))
    if config["qc"]:
        outputs += qc_outputs()
    return outputs
