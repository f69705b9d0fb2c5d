# packet declarations: parse, NAT rewrite with incremental checksums, TTL,
# ICMP "too big" replies (pkt_), and VXLAN encap/decap (vxlan_).
#
# Every function here is a nogil C function over a raw frame pointer and its
# length; none allocates, none raises.  Functions that can refuse a packet
# return 0 or a DropReason code (includes/drop_reasons.def).  The fused datapath calls
# them per packet; packet.pyx wraps them in a batch API and a small Python
# surface.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t

cdef enum:
    PKT_ETH_LEN = 14
    PKT_ETH_P_IP = 0x0800
    PKT_ETH_P_IPV6 = 0x86DD
    PKT_ETH_P_8021Q = 0x8100
    PKT_ETH_P_8021AD = 0x88A8
    PKT_IPPROTO_ICMP = 1
    PKT_IPPROTO_TCP = 6
    PKT_IPPROTO_UDP = 17
    PKT_IPPROTO_ICMPV6 = 58
    # fragment state of the (outer) IP packet
    PKT_FRAG_NONE = 0
    PKT_FRAG_FIRST = 1          # offset 0, more fragments: carries the L4 header
    PKT_FRAG_LATER = 2          # offset > 0: no L4 header, no ports
    # which side a NAT rewrite changes
    PKT_NAT_SRC = 0             # SNAT: source address/port (egress direction)
    PKT_NAT_DST = 1             # DNAT / reverse SNAT: destination (reply direction)
    PKT_MAX_FRAME = 65535 + 18  # an IP packet of 64 KiB behind Ethernet + 802.1Q
    # VXLAN (RFC 7348) over IPv4: outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
    VXLAN_HDR_LEN = 8
    VXLAN_OVERHEAD = 50
    VXLAN_DEFAULT_PORT = 8472   # Linux/Cilium default (IANA's is 4789)
    VXLAN_FLAG_I = 0x08

# What pkt_parse found.  Offsets count from the first byte of the frame; all
# were checked against the frame length, so reading the field they name (of
# the size the protocol fixes) stays inside the buffer.  Ports and addresses
# are in host byte order.
cdef struct PktInfo:
    int32_t l3_off          # IP header
    int32_t l4_off          # L4 header, -1 when absent (later fragment)
    int32_t l3_end          # end of the IP packet (IP length; Ethernet padding excluded)
    uint16_t ethertype      # PKT_ETH_P_IP or PKT_ETH_P_IPV6
    uint16_t vlan_tci       # 802.1Q tag control (has_vlan)
    uint8_t has_vlan
    uint8_t ip_version      # 4 or 6
    uint8_t proto           # L4 protocol (after IPv6 extension headers)
    uint8_t ttl             # TTL / hop limit
    uint8_t frag            # PKT_FRAG_*
    uint8_t df              # IPv4 DF bit (always 1 for IPv6: routers never fragment)
    uint8_t has_ports       # sport/dport (or the echo identifier) are meaningful
    uint8_t icmp_type
    uint8_t icmp_code
    uint8_t icmp_err        # ICMP/ICMPv6 error with a parsed embedded packet
    uint8_t tcp_flags
    uint16_t sport          # TCP/UDP ports; ICMP echo request: id as sport,
    uint16_t dport          # echo reply: id as dport (as Cilium's NAT does)
    uint32_t src4           # IPv4 addresses (0 for IPv6: read l3_off + 8/24)
    uint32_t dst4
    # the packet quoted in an ICMP error (icmp_err == 1)
    int32_t in_l3_off
    int32_t in_l4_off
    int32_t in_end          # end of the quote
    uint8_t in_proto
    uint8_t in_has_ports
    uint16_t in_sport
    uint16_t in_dport
    uint32_t in_src4
    uint32_t in_dst4

# A precomputed outer header, patched per packet (total length, its checksum,
# UDP source port and length), as VPP's vxlan encap does.
cdef struct VxlanTmpl:
    uint8_t hdr[VXLAN_OVERHEAD]
    uint16_t port_min       # outer UDP source port range (flow hash spread)
    uint16_t port_max
    uint32_t mtu            # underlay MTU (largest outer IP packet)
    uint32_t src4           # outer source address (source of "too big" replies)

cdef struct VxlanDecapInfo:
    int32_t inner_off       # inner Ethernet frame, relative to the outer frame
    int32_t inner_len
    uint32_t vni
    uint32_t outer_src4     # underlay addresses (0 with an IPv6 underlay)
    uint32_t outer_dst4
    uint16_t outer_sport

# Parse an Ethernet frame.  Returns 0 or DROP_MALFORMED / DROP_UNSUPPORTED /
# DROP_CSUM (IPv4 header checksum).  Never reads outside buf[0:length].
cdef int pkt_parse(const uint8_t *buf, int64_t length, PktInfo *pi) noexcept nogil

# Rewrite the address (and port, if port >= 0 and the packet has one on that
# side) of `side` (PKT_NAT_SRC / PKT_NAT_DST) with RFC 1624 checksum updates.
# ICMP errors are translated outside and inside (RFC 5508): outer `side`
# address, embedded opposite side address + port and their checksums.
# Updates pi's address/port fields.  Returns 0, DROP_FRAGMENT (later fragment)
# or DROP_UNSUPPORTED (protocol without ports/ICMP embedded not translatable).
cdef int pkt_nat4(uint8_t *buf, PktInfo *pi, int side, uint32_t addr, int32_t port) noexcept nogil
cdef int pkt_nat6(uint8_t *buf, PktInfo *pi, int side, const uint8_t *addr, int32_t port) noexcept nogil
cdef int pkt_snat4(uint8_t *buf, PktInfo *pi, uint32_t addr, int32_t port) noexcept nogil
cdef int pkt_dnat4(uint8_t *buf, PktInfo *pi, uint32_t addr, int32_t port) noexcept nogil

# Decrement TTL (IPv4, with checksum) or hop limit.  0 or DROP_TTL_EXCEEDED
# (TTL <= 1: the packet would expire here).
cdef int pkt_ttl_decrement(uint8_t *buf, PktInfo *pi) noexcept nogil

# Build into out[0:cap] the ICMP fragmentation-needed (IPv4, type 3 code 4) or
# ICMPv6 packet-too-big reply to the sender of the parsed packet, reporting
# `mtu`.  src: source address of the reply (4 or 16 bytes), NULL = the
# original destination (what Linux tunnels do for bridged traffic).  Returns
# the reply's length, or 0 when none may be sent (ICMP error, later fragment,
# cap too small).
cdef int64_t pkt_icmp_too_big(const uint8_t *buf, const PktInfo *pi, uint8_t *out,
                              int64_t cap, uint32_t mtu, const uint8_t *src) noexcept nogil

# VXLAN.  vxlan_tmpl_init fills a template; vxlan_src_port hashes the inner
# flow into the template's port range; vxlan_check_mtu returns 0 or
# DROP_FRAG_NEEDED (too big with DF/IPv6: answer with pkt_icmp_too_big) or
# DROP_UNSUPPORTED (too big without DF: outer fragmentation not done).
# (length: the inner frame's; the outer IP packet is length + 36 bytes.)
# vxlan_encap_frame writes the outer header at frame - VXLAN_OVERHEAD (the caller
# guarantees that headroom) and returns the outer frame length.
cdef void vxlan_tmpl_init(VxlanTmpl *t, const uint8_t *src_mac, const uint8_t *dst_mac,
                          uint32_t src4, uint32_t dst4, uint32_t vni, uint16_t port,
                          uint8_t ttl, uint32_t mtu, uint16_t port_min, uint16_t port_max) noexcept nogil
cdef uint16_t vxlan_src_port(const uint8_t *buf, const PktInfo *pi, const VxlanTmpl *t) noexcept nogil
cdef int vxlan_check_mtu(const PktInfo *pi, int64_t length, const VxlanTmpl *t) noexcept nogil
cdef int64_t vxlan_encap_frame(uint8_t *frame, int64_t length, const VxlanTmpl *t, uint16_t sport) noexcept nogil
# Validate and locate the inner frame of a VXLAN packet (no copy).  vni < 0
# accepts any VNI.  Returns 0 or DROP_MALFORMED / DROP_UNSUPPORTED /
# DROP_CSUM / DROP_FRAGMENT / DROP_BAD_VXLAN (port, flags, reserved bits, VNI).
cdef int vxlan_decap_frame(const uint8_t *buf, int64_t length, uint16_t port, int64_t vni,
                           VxlanDecapInfo *out) noexcept nogil

# VXLAN over an IPv6 underlay (packet/vxlan6.pyx): outer Ethernet 14 +
# IPv6 40 + UDP 8 + VXLAN 8.  The outer UDP checksum is computed (RFC 8200;
# Linux vxlan devices refuse a zero one by default, udp6zerocsumrx).
cdef enum:
    VXLAN6_OVERHEAD = 70

cdef struct Vxlan6Tmpl:
    uint8_t hdr[VXLAN6_OVERHEAD]
    uint16_t port_min
    uint16_t port_max
    uint32_t mtu            # underlay MTU (largest outer IPv6 packet)
    uint32_t sum            # pseudo-header sum of the addresses and next header

cdef void vxlan6_tmpl_init(Vxlan6Tmpl *t, const uint8_t *src_mac, const uint8_t *dst_mac,
                           const uint8_t *src6, const uint8_t *dst6, uint32_t vni, uint16_t port,
                           uint8_t hlim, uint32_t mtu, uint16_t port_min, uint16_t port_max) noexcept nogil
cdef int64_t vxlan6_encap_frame(uint8_t *frame, int64_t length, const Vxlan6Tmpl *t,
                                uint16_t sport) noexcept nogil

cdef class VxlanTemplate:
    cdef VxlanTmpl t

cdef class PacketBatch:
    cdef readonly object frames
    cdef readonly object offsets
    cdef readonly object lengths
    cdef readonly object verdicts
    cdef readonly object reasons
    cdef readonly object vnis
    cdef readonly object counters
    cdef uint8_t[:, ::1] _f
    cdef int32_t[::1] _off
    cdef int32_t[::1] _len
    cdef uint8_t[::1] _verd
    cdef uint8_t[::1] _reas
    cdef uint32_t[::1] _vni
    cdef uint64_t[::1] _cnt
    cdef PktInfo *_info
    cdef uint8_t *_parsed
    cdef Py_ssize_t n
    cdef readonly Py_ssize_t headroom
    cdef inline uint8_t *_row(self, Py_ssize_t i) noexcept nogil
    cdef inline void _drop(self, Py_ssize_t i, int reason) noexcept nogil
    cdef inline bint _live(self, Py_ssize_t i) noexcept nogil
    cdef inline int _ensure_parsed(self, Py_ssize_t i, uint8_t *p) noexcept nogil
    cdef _nat(self, int side, addr, port)
    cdef void _nat_loop(self, int side, const uint32_t *a, Py_ssize_t a_step,
                        const int32_t *pt, Py_ssize_t p_step) noexcept nogil
    cdef void _relay_loop(self, const VxlanTmpl *t, uint16_t uport, int64_t want, int side,
                          uint32_t addr, int32_t port, bint dec_ttl) noexcept nogil
    cdef void _too_big_in_place(self, Py_ssize_t i, const VxlanTmpl *t) noexcept nogil
