# datapath declarations: the fused per-batch pipeline (dp_).
#
#   RX ring frame -> pkt_parse -> egress map -> NAT -> pkt_nat4 -> VXLAN
#   encap/decap -> TX ring, all nogil C, one call per batch.
#
# Ports: index 0 is the underlay (the node's eth0), 1..63 are pod veths
# (lxc-*), DP_TUNNEL_PORT a TX ring on a kernel vxlan device (tunnel offload).
# Addresses in dp_ structs are IPv4, host order.  One thread per Datapath (the
# NAT table it drives has one writer).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t

cdef enum:
    DP_MAX_PORTS = 64
    DP_MAX_NODES = 256
    DP_HEADROOM = 128
    DP_SCRATCH = 65536 + 256
    DP_BATCH = 256
    DP_TUNNEL_PORT = 64         # TX only: a kernel vxlan device that encapsulates super-packets

cdef extern from "datapath/podmac.h" nogil:
    uint64_t dp_podmac_word(const uint8_t *m)
    uint64_t dp_podmac_load(const uint64_t *cell)
    void dp_podmac_learn(uint64_t *cell, const uint8_t *m)
    void dp_podmac_store(uint64_t *cell, uint64_t w)
    void dp_podmac_put(uint8_t *dst, uint64_t w)


cdef struct dp_node:
    uint32_t ip                 # underlay address
    uint8_t mac[6]              # its Ethernet address (learned neighbour)
    uint8_t has_mac
    uint8_t valid
    VxlanTmpl tmpl              # outer header towards it (valid with has_mac)
    uint8_t ip6[16]             # its IPv6 underlay address (has_ip6; datapath/v6.pyx)
    uint8_t has_ip6
    Vxlan6Tmpl tmpl6            # outer IPv6 header towards it (with dp_ctx.underlay6)

cdef struct dp_port:
    uint32_t pod_ip             # the pod behind this veth (0: underlay / unknown)
    uint8_t host_mac[6]         # our end of the veth (the pod's MAC: dp_ctx.pod_macs)
    uint8_t used
    uint8_t pod_ip6[16]         # the pod's IPv6 address (has_ip6)
    uint8_t has_ip6
    uint8_t nat_cold            # its last batch looked the NAT table up for under half its frames (nat_ahead.pyx)

# Counters, readable from Python at any time (Datapath.counters()).
cdef struct dp_stats:
    uint64_t rx                 # frames looked at
    uint64_t passed             # not ours: left to the kernel
    uint64_t tx                 # sent on the underlay
    uint64_t tx_local           # delivered to a local pod
    uint64_t dropped
    uint64_t encap              # VXLAN to a gateway / back to a pod's node
    uint64_t decap              # VXLAN accepted
    uint64_t snat_egress        # SNAT to an egress IP (gateway role)
    uint64_t masquerade         # SNAT to the node IP (default)
    uint64_t reverse_nat        # replies translated back
    uint64_t icmp_too_big       # frag-needed replies sent
    uint64_t icmp_errors        # ICMP errors translated (RFC 5508)
    uint64_t tx_errors          # frames lost at transmit (ring full)
    uint64_t drops[DROP_REASON_MAX]     # by DropReason
    uint64_t vpkts[4]           # frames by Verdict
    uint64_t vbytes[4]          # their bytes (as received, Ethernet header included)

# Per-policy counters (Datapath.policy_counters()), one record per policy
# slot (includes/policy.pxd), counted when a frame's verdict is known
# (dp_done) for the policy its stage found: the egress map entry's on the
# source node and for the gateway's SNAT, the NAT entry's for replies.
# Bytes are the frame as the pod sends or receives it (Ethernet header
# included, no VXLAN), so they compare with the pod interface's counters.
cdef enum:
    DP_POL_REDIRECT = 0         # source node: sent through the tunnel to the gateway
    DP_POL_EGRESS = 1           # gateway: SNATed to the egress IP, out to the destination
    DP_POL_REPLY = 2            # gateway: a reply reverse-NATed, back to the pod
    DP_POL_DIRS = 3

cdef struct dp_policy:
    uint64_t pkts[3]            # forwarded frames by DP_POL_*
    uint64_t bytes[3]
    uint64_t drops[DROP_REASON_MAX]     # frames of the policy dropped, by DropReason

cdef struct dp_out:
    int port                    # where the frame goes (-1: nowhere)
    uint8_t *data
    int64_t length
    uint8_t gso_type            # virtio_net_hdr for the TX frame (0: plain frame)
    uint16_t gso_size
    uint16_t hdr_len
    uint16_t csum_start         # NEEDS_CSUM when csum_offset != 0
    uint16_t csum_offset

# struct virtio_net_hdr (PACKET_VNET_HDR), host byte order
cdef packed struct dp_vnet:
    uint8_t flags
    uint8_t gso_type
    uint16_t hdr_len
    uint16_t gso_size
    uint16_t csum_start
    uint16_t csum_offset

# Where c.emit = dp_capture puts output frames (process_frames, process_batch)
# instead of a TX ring: packed into buf, one dp_out each (data points into buf).
cdef struct dp_sink:
    uint8_t *buf
    int64_t size
    int64_t used
    dp_out *outs
    int32_t *frame              # the input frame each output came from (NULL: not kept)
    int n
    int max
    int cur                     # the input frame being handled (dp_rx_frames counts)

cdef struct dp_ctx:
    # one node's forwarding state: every stage (egress, ingress, emit) works on it
    uint32_t node_ip
    uint8_t node_mac[6]
    uint8_t router_mac[6]
    uint8_t has_router
    uint32_t vni
    uint16_t vxlan_port
    uint32_t mtu
    uint16_t nat_lo
    uint16_t nat_hi
    int node_ext  # NAT index of the node IP (masquerade)
    dp_port ports[64]
    uint64_t pod_mac_own[64]  # by port: the pod's MAC, learned from its frames or set (datapath/podmac.h)
    uint64_t * pod_macs  # the table in use: pod_mac_own, or worker 0's (Datapath.share_pod_macs)
    dp_node nodes[256]
    dp_stats st
    uint8_t * scratch  # DP_SCRATCH bytes: the frame being worked on
    uint8_t * reply  # ICMP replies
    uint8_t * segbuf  # one TCP segment cut from a GSO frame
    uint8_t gso  # the frame being handled is a GSO super-packet
    uint8_t gso_type
    uint16_t gso_size
    uint64_t gso_frames  # super-packets passed through whole
    uint64_t gso_segmented  # super-packets cut into segments (for VXLAN)
    uint64_t gso_tunneled  # super-packets handed whole to the kernel vxlan device
    uint8_t rx_writable  # frames come from RX slots (poll): super-packets are rewritten in place
    uint8_t tnl_on  # tunnel offload: tunnel-bound super-packets go to DP_TUNNEL_PORT
    ring_t * rings[65]  # by port, DP_TUNNEL_PORT last
    uint8_t dirty[65]
    dp_sink * sink  # capture mode (process_frames, process_batch): emitted frames land here
    int n_rings
    egress_map * em_c
    nat_table * nat_c
    lpm_trie * pod_nodes_c
    lpm_trie * node_ips_c
    lpm_trie * local_pods_c
    flow_log * flog  # drop records go here when not NULL (set_flow_log)
    gwpin_table * pins  # make-before-break when not NULL (set_make_before_break)
    uint8_t pin_ahead  # the caller prefetched the first pins of each dp_rx_frames batch
    uint8_t read_held  # the caller holds the read section across dp_rx_frames batches (process_batch)
    dp_policy * pol  # POLICY_SLOTS records (per-policy counters)
    uint32_t cur_pol  # the frame being handled: its policy id (0: none), set by its stage
    uint32_t cur_pol_dir  # its DP_POL_* direction
    int64_t cur_pol_len  # the bytes to count for it
    void (*emit)(dp_ctx *c, dp_out *o) noexcept nogil   # dp_emit, or dp_capture (process_frames)
    # IPv6 pods (datapath/v6.pyx): off (IPv6 left to the kernel) unless has_ip6
    uint8_t node_ip6[16]  # the node's IPv6 address: default masquerade of IPv6 pod traffic
    uint8_t has_ip6
    int node_ext6  # NAT index of node_ip6
    uint8_t router6_mac[6]  # IPv6 next hop (has_router6; else router_mac)
    uint8_t has_router6
    lpm_trie * pod_nodes6_c  # IPv6 pod CIDR -> node index
    lpm_trie * node_ips6_c  # node IPv6 /128 -> node index
    lpm_trie * local_pods6_c  # local pod IPv6 /128 -> port
    uint8_t underlay6  # VXLAN over the IPv6 underlay (nodes' ip6); mtu is then the underlay's - 20

cdef class Datapath:
    cdef dp_ctx c
    cdef object _rings          # port -> PacketRing (or None)
    cdef readonly EgressMap egress_map
    cdef readonly NatTable nat
    cdef readonly LPMTrie pod_nodes     # pod CIDR -> node index
    cdef readonly LPMTrie node_ips      # node IP /32 -> node index
    cdef readonly LPMTrie local_pods    # local pod IP /32 -> port
    cdef object _flow_log
    cdef object _mac_owner              # share_pod_macs(): the Datapath whose pod MAC table this one uses
    cdef readonly GatewayPins pins      # make-before-break (None: off)
    cdef readonly LPMTrie pod_nodes6    # IPv6 pod CIDR -> node index
    cdef readonly LPMTrie node_ips6     # node IPv6 /128 -> node index
    cdef readonly LPMTrie local_pods6   # local pod IPv6 /128 -> port
    cdef uint64_t nap_ns                # run(): nap under dense traffic (rx_coalesce_us)
    cdef uint64_t loop_polls, loop_wakeups, loop_naps, loop_naps_empty, loop_batches
    cdef uint64_t loop_left_ns          # run(): when the C loop last ended (0: never)
    cdef uint64_t loop_gil_max_ns, loop_away_max_ns, loop_away_long
    cdef Py_ssize_t dp_run(self, uint64_t ns, int wake_fd) noexcept nogil
