# Cython looks up the pxd of module egresscore._core by its dotted name in
# the include path (src/); this file makes it find src/_core.pxd.
include "_core.pxd"
