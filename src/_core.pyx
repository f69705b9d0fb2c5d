# cython: language_level=3
"""egresscore's native core: one extension module, one translation unit.

Each concern lives in its own folder and is included here, so the fused
datapath calls the LPM trie, the NAT table, the packet engine and the rings
as plain C functions, with no cross-module cimport.  The tree:

  includes/  shared C: byte order, checksums, the allocator, address/MAC
             conversion, verdicts and the drop-reason table (drop_reasons.def),
             the one map from C error codes to exceptions (errors.pxi)
  lpm/       the poptrie-style LPM trie and the egress policy map
  nat/       index, port pools, conntrack with its timing wheel, batches, the state
             file and its seal, NatTable
  gwpin/     the gateway each connection started on (make-before-break), GatewayPins
  flowlog/   the flow-record ring and FlowLog
  packet/    parse, rewrite, ICMP, VXLAN (IPv4 and IPv6 underlays), the Python
             surface, PacketBatch
  ring/      AF_PACKET TPACKET_V3 rings (PacketRing)
  health/    heartbeat answers in C, GIL released (HeartbeatAnswerer)
  datapath/  the fused pipeline: shared stages, make-before-break (pins),
             the NAT prefetch ahead of each batch (nat_ahead), egress (from
             pods), ingress (from the underlay), the IPv6 stages (v6), emit,
             and the Datapath class, over dp_ctx
"""

include "includes/drop_reasons.pxi"
include "includes/addr.pxi"
include "includes/errors.pxi"
include "lpm/lpm.pyx"
include "nat/index.pyx"
include "nat/ports.pyx"
include "nat/conntrack.pyx"
include "nat/batch.pyx"
include "nat/state.pyx"
include "nat/seal.pyx"
include "nat/table.pyx"
include "gwpin/gwpin.pyx"
include "flowlog/flowlog.pyx"
include "nat/repl.pyx"
include "packet/parse.pyx"
include "packet/rewrite.pyx"
include "packet/icmp.pyx"
include "packet/vxlan.pyx"
include "packet/vxlan6.pyx"
include "packet/api.pyx"
include "packet/batch.pyx"
include "ring/ring.pyx"
include "health/heartbeat.pyx"
include "datapath/stages.pyx"
include "datapath/pins.pyx"
include "datapath/nat_ahead.pyx"
include "datapath/egress.pyx"
include "datapath/ingress.pyx"
include "datapath/v6.pyx"
include "datapath/emit.pyx"
include "datapath/datapath.pyx"
