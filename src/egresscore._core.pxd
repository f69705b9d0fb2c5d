# Cython looks up a module's declarations by its qualified name, so for
# egresscore._core built from src/_core.pyx it reads this dotted file (a plain
# src/_core.pxd is not found); it pulls in the per-concern declarations.
include "_core.pxd"
