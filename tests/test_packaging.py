"""Packaging: the pinned versions in constraints.txt and the conda environment cover the dependencies
that pyproject.toml declares, so that neither drifts when a dependency is added."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+

# conda-forge's names for the PyPI packages whose names differ there.
CONDA_NAMES = {"isal": "python-isal", "matplotlib": "matplotlib-base", "snakemake": "snakemake-minimal"}


def _name(requirement: str) -> str:
    """PEP 503 normalised project name of a requirement such as ``numpy>=1.25``."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9._-]+)", requirement).group(1)).lower()


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_constraints_pin_every_dependency_of_the_workflow_and_the_tests():
    project = _pyproject()
    extras = project["optional-dependencies"]
    wanted = {_name(r) for r in project["dependencies"]}
    wanted |= {_name(r) for extra in ("workflow", "qc", "slurm", "test") for r in extras[extra]}
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact pin"
            pins[_name(name)] = version
    assert wanted <= pins.keys(), f"not pinned in constraints.txt: {sorted(wanted - pins.keys())}"


def test_conda_environment_has_the_runtime_and_workflow_dependencies():
    project = _pyproject()
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["workflow"]}
    listed = set()
    in_dependencies = False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if line.startswith("dependencies:"):
            in_dependencies = True
        elif in_dependencies and line.lstrip().startswith("- "):
            listed.add(_name(line.lstrip()[2:]))
        elif in_dependencies and line and not line.startswith((" ", "#")):
            in_dependencies = False
    missing = {n for n in wanted if CONDA_NAMES.get(n, n) not in listed}
    assert not missing, f"environment.yml lacks {sorted(missing)}"
