# Cython looks for the declarations of module egresscore._core at
# <include dir>/egresscore/_core.pxd (setup.py names the module by its package
# path, and src/ is not a package); the declarations live in src/_core.pxd.
include "../_core.pxd"
