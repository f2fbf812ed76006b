"""Builds the optional native kernels (pipeline/_native.c); everything else is in pyproject.toml.

The extension is optional: without a C compiler the package installs and falls back to scipy.ndimage.
-ffp-contract=off keeps multiplications and additions unfused, so results do not depend on the CPU.
"""

import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "pipeline/_native.c"
# Recorded in the library: pipeline/native.py refuses a library built from another version of the
# source (an editable checkout updated without a rebuild would otherwise call it with new arguments).
SOURCE_SHA256 = hashlib.sha256((Path(__file__).parent / SOURCE).read_bytes()).hexdigest()

setup(
    ext_modules=[
        Extension(
            "pipeline._native",
            sources=[SOURCE],
            define_macros=[("VF_SOURCE_SHA256", f'"{SOURCE_SHA256}"')],
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
