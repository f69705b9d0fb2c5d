# Declarations of the native core's cdef classes and C structs, one file per
# concern, so a later module can cimport egresscore._core at C level.
include "includes/byteorder.pxd"
include "includes/csum.pxd"
include "includes/alloc.pxd"
include "includes/verdict.pxd"
include "includes/policy.pxd"
include "lpm/lpm.pxd"
include "flowlog/flowlog.pxd"
include "nat/nat.pxd"
include "nat/state.pxd"
include "packet/packet.pxd"
include "ring/ring.pxd"
include "datapath/datapath.pxd"
