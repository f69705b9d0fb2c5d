# cython: language_level=3
"""egresscore's native core: one extension module, one translation unit.

Each concern lives in its own file and is included here, so the fused
datapath (datapath.pyx) calls the LPM trie, the NAT table, the packet engine
and the rings as plain C functions, with no cross-module cimport.
"""

include "includes/drop_reasons.pxi"
include "includes/addr.pxi"
include "lpm.pyx"
include "nat.pyx"
include "flowlog.pyx"
include "packet.pyx"
include "ring.pyx"
include "datapath.pyx"
