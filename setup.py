"""Builds the optional native kernels (pipeline/_native.c); everything else is in pyproject.toml.

The extension is optional: without a C compiler the package installs and falls back to scipy.ndimage.
-ffp-contract=off keeps multiplications and additions unfused, so results do not depend on the CPU.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pipeline._native",
            sources=["pipeline/_native.c"],
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
