# Declarations of the native core's cdef classes and C structs, one file per
# concern, so a later module can cimport egresscore._core at C level.
include "includes/byteorder.pxd"
include "includes/csum.pxd"
include "includes/alloc.pxd"
include "includes/verdict.pxd"
include "lpm.pxd"
include "flowlog.pxd"
include "nat.pxd"
include "packet.pxd"
include "ring.pxd"
include "datapath.pxd"
