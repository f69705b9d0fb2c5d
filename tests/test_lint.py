"""Lint is part of the tests: ruff over the Python tree and cython-lint over src/,
both with the configuration in pyproject.toml (line length 120).

A finding fails the test with the linter's own report, so the fix is in the
output.  Both linters come with the `test` extra.
"""
import glob
import os
import subprocess
import sys

from conftest import require_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_is_clean():
    require_module("ruff", "the PyPI package ruff (in the test extra)")
    done = _run(["-m", "ruff", "check", "--no-cache", "."])
    assert done.returncode == 0, f"ruff found problems:\n{done.stdout}{done.stderr}"


def test_cython_lint_is_clean():
    require_module("cython_lint", "the PyPI package cython-lint (in the test extra)")
    sources = sorted(glob.glob("src/**/*.pyx", root_dir=ROOT, recursive=True)
                     + glob.glob("src/**/*.pxd", root_dir=ROOT, recursive=True)
                     + glob.glob("src/**/*.pxi", root_dir=ROOT, recursive=True))
    generated = {os.path.join("src", "includes", name) for name in ("drop_reasons.pxd", "drop_reasons.pxi")}
    sources = [s for s in sources if s not in generated]
    assert len(sources) > 20, sources
    done = _run(["-c", "import sys; from cython_lint.cython_lint import main; sys.exit(main())", *sources])
    assert done.returncode == 0, f"cython-lint found problems:\n{done.stdout}{done.stderr}"
