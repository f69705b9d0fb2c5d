# Cython finds the pxd of module egresscore._core under this dotted name
# (setup.py builds src/_core.pyx as egresscore._core); the declarations
# live in _core.pxd.
include "_core.pxd"
