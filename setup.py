"""Build the single native extension, egresscore._core, from src/.

src/_core.pyx includes one .pyx per concern so the fused datapath calls every
piece at C level inside one translation unit.  Set EGRESSCORE_CHECKED=1 to
build with Cython bounds checking on (used to run the malformed-packet corpus).
"""
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

checked = os.environ.get("EGRESSCORE_CHECKED") == "1"

directives = {
    "language_level": 3,
    "boundscheck": checked,
    "wraparound": False,
    "initializedcheck": checked,
    "cdivision": True,
    "embedsignature": True,
}

extensions = [
    Extension(
        "egresscore._core",
        ["src/_core.pyx"],
        include_dirs=["src", numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3", "-Wno-unused-function", "-Wno-unreachable-code"]
        + (["-UNDEBUG", "-DEGRESSCORE_CHECKED=1"] if checked else []),
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        include_path=["src"],
        build_dir="build/cython-checked" if checked else None,
    ),
)
