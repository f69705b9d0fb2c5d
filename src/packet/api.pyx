# --------------------------------------------------------------------------
# Python surface: small, for tests and embedding (the datapath uses the C API)

import collections as _pkt_collections

PacketInfo = _pkt_collections.namedtuple(
    "PacketInfo",
    "ip_version src dst proto sport dport ttl frag df vlan icmp_type icmp_code "
    "l3_offset l4_offset inner",
)
PacketInfo.__doc__ = """What egresscore.parse() found in a frame.

src/dst are ipaddress objects; sport/dport are None without ports (an ICMP
echo request's id is its sport, a reply's its dport, as in Cilium's NAT);
frag is "none", "first" or "later"; vlan is the 802.1Q TCI or None; inner
describes the packet quoted by an ICMP error as (proto, src, dst, sport,
dport), else None."""

_PKT_FRAG_NAMES = ("none", "first", "later")


cdef class _PktBuf:
    """A private copy of a frame with headroom in front, exactly sized (so a
    sanitizer build catches any read past the end)."""
    cdef uint8_t *mem
    cdef uint8_t *p
    cdef int64_t n

    def __cinit__(self, data, Py_ssize_t headroom=0):
        cdef const uint8_t[::1] view
        try:
            view = memoryview(data).cast("B")
        except TypeError:
            raise TypeError(f"frame must be bytes-like, not {type(data).__name__}") from None
        self.n = view.shape[0]
        self.mem = <uint8_t *>malloc(headroom + self.n if headroom + self.n > 0 else 1)
        if self.mem == NULL:
            raise no_memory("frame buffer")
        self.p = self.mem + headroom
        if self.n:
            memcpy(self.p, &view[0], self.n)

    def __dealloc__(self):
        free(self.mem)

    cdef bytes out(self):
        return (<char *>self.p)[:self.n]


cdef inline int _pkt_parse_buf(_PktBuf b, PktInfo *pi) except -1:
    cdef int rc = pkt_parse(b.p, b.n, pi)
    if rc:
        raise drop_error(rc)
    return 0


cdef int32_t _pkt_port(object port) except -2:
    if port is None:
        return -1
    if not isinstance(port, int) or not 0 <= port <= 0xffff:
        raise ValueError(f"port must be an int in 0..65535 or None, got {port!r}")
    return port


cdef tuple _pkt_addr_pair(int version, uint32_t src4, uint32_t dst4, const uint8_t *ip):
    """(source, destination) of the IP header at ip, as ipaddress objects."""
    if version == 4:
        return _ipaddress.IPv4Address(src4), _ipaddress.IPv4Address(dst4)
    return (_ipaddress.IPv6Address(bytes(ip[8:24])), _ipaddress.IPv6Address(bytes(ip[24:40])))


def parse(frame):
    """Parse an Ethernet frame; raise PacketDropped for one the datapath drops."""
    cdef _PktBuf b = _PktBuf(frame)
    cdef PktInfo pi
    _pkt_parse_buf(b, &pi)
    src, dst = _pkt_addr_pair(pi.ip_version, pi.src4, pi.dst4, b.p + pi.l3_off)
    inner = None
    if pi.icmp_err:
        isrc, idst = _pkt_addr_pair(pi.ip_version, pi.in_src4, pi.in_dst4, b.p + pi.in_l3_off)
        inner = (pi.in_proto, isrc, idst,
                 pi.in_sport if pi.in_has_ports else None,
                 pi.in_dport if pi.in_has_ports else None)
    is_icmp = pi.l4_off >= 0 and (pi.proto == PKT_IPPROTO_ICMP or pi.proto == PKT_IPPROTO_ICMPV6)
    return PacketInfo(
        ip_version=pi.ip_version, src=src, dst=dst, proto=pi.proto,
        sport=pi.sport if pi.has_ports else None,
        dport=pi.dport if pi.has_ports else None,
        ttl=pi.ttl, frag=_PKT_FRAG_NAMES[pi.frag], df=bool(pi.df),
        vlan=pi.vlan_tci if pi.has_vlan else None,
        icmp_type=pi.icmp_type if is_icmp else None,
        icmp_code=pi.icmp_code if is_icmp else None,
        l3_offset=pi.l3_off, l4_offset=pi.l4_off if pi.l4_off >= 0 else None,
        inner=inner,
    )


cdef bytes _pkt_nat_py(frame, int side, addr, port):
    cdef _PktBuf b = _PktBuf(frame)
    cdef PktInfo pi
    cdef int rc
    cdef int32_t p = _pkt_port(port)
    cdef bytes a16
    a = addr_object(addr, "addr")
    _pkt_parse_buf(b, &pi)
    if a.version != pi.ip_version:
        raise ValueError(f"addr {a} is IPv{a.version} but the frame is IPv{pi.ip_version}")
    if a.version == 4:
        rc = pkt_nat4(b.p, &pi, side, int(a), p)
    else:
        a16 = a.packed
        rc = pkt_nat6(b.p, &pi, side, a16, p)
    if rc:
        raise drop_error(rc)
    return b.out()


def snat(frame, addr, port=None):
    """Source NAT: new source address (and port / echo id, if given), with
    every checksum updated incrementally; ICMP errors translated inside too."""
    return _pkt_nat_py(frame, PKT_NAT_SRC, addr, port)


def dnat(frame, addr, port=None):
    """Destination NAT, i.e. reverse SNAT of a reply: new destination address
    (and port / echo id); an ICMP error's quoted source is translated too."""
    return _pkt_nat_py(frame, PKT_NAT_DST, addr, port)


def ttl_decrement(frame):
    """Decrement TTL / hop limit as a router does (drop ttl_exceeded at 1)."""
    cdef _PktBuf b = _PktBuf(frame)
    cdef PktInfo pi
    cdef int rc
    _pkt_parse_buf(b, &pi)
    rc = pkt_ttl_decrement(b.p, &pi)
    if rc:
        raise drop_error(rc)
    return b.out()


def icmp_too_big(frame, mtu, src=None):
    """The ICMP fragmentation-needed (IPv6: packet-too-big) reply to the
    sender of `frame`, reporting `mtu`; src defaults to the frame's
    destination.  b"" when RFC 1122/4443 forbid a reply."""
    cdef _PktBuf b = _PktBuf(frame)
    cdef PktInfo pi
    cdef uint8_t out[1400]
    cdef int64_t n
    cdef bytes s = None
    if not isinstance(mtu, int) or not 68 <= mtu <= 0xffffffff:
        raise ValueError(f"mtu must be an int >= 68, got {mtu!r}")
    _pkt_parse_buf(b, &pi)
    if src is not None:
        a = addr_object(src, "src")
        if a.version != pi.ip_version:
            raise ValueError(f"src {a} is IPv{a.version} but the frame is IPv{pi.ip_version}")
        s = a.packed
    cdef const uint8_t *sp = NULL
    if s is not None:
        sp = s
    n = pkt_icmp_too_big(b.p, &pi, out, sizeof(out), mtu, sp)
    return (<char *>out)[:n]


cdef class VxlanTemplate:
    """The precomputed outer Ethernet + IPv4 + UDP + VXLAN header of one
    tunnel (this node -> a peer node), patched per packet on encap.

    port: VXLAN UDP port (Cilium's default 8472); mtu: underlay MTU, frames
    whose outer packet would exceed it are answered with ICMP too-big;
    port_range: outer source ports the flow hash spreads over (Linux's
    default ip_local_port_range)."""

    def __init__(self, src_mac, dst_mac, src_ip, dst_ip, vni, *, port=VXLAN_DEFAULT_PORT,
                 ttl=64, mtu=1500, port_range=(32768, 60999)):
        smac = mac_bytes(src_mac, "src_mac")
        dmac = mac_bytes(dst_mac, "dst_mac")
        s = addr_object(src_ip, "src_ip")
        d = addr_object(dst_ip, "dst_ip")
        if s.version != 4 or d.version != 4:
            raise ValueError("src_ip and dst_ip must be IPv4 (the underlay is IPv4)")
        if not isinstance(vni, int) or not 0 <= vni < (1 << 24):
            raise ValueError(f"vni must be an int in 0..2**24-1, got {vni!r}")
        if not isinstance(port, int) or not 1 <= port <= 0xffff:
            raise ValueError(f"port must be an int in 1..65535, got {port!r}")
        if not isinstance(ttl, int) or not 1 <= ttl <= 255:
            raise ValueError(f"ttl must be an int in 1..255, got {ttl!r}")
        if not isinstance(mtu, int) or not 68 + 36 <= mtu <= 0xffff:
            raise ValueError(f"mtu must be an int in 104..65535, got {mtu!r}")
        lo, hi = port_range
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= 0xffff):
            raise ValueError(f"port_range must be (low, high) within 1..65535, got {port_range!r}")
        vxlan_tmpl_init(&self.t, smac, dmac, int(s), int(d), vni, port, ttl, mtu, lo, hi)

    @property
    def header(self):
        """The 50-byte outer header with length, checksum and source port unset."""
        return (<char *>self.t.hdr)[:VXLAN_OVERHEAD]

    @property
    def mtu(self):
        return self.t.mtu

    def source_port(self, frame):
        """The outer UDP source port encap uses for this inner frame."""
        cdef _PktBuf b = _PktBuf(frame)
        cdef PktInfo pi
        if b.n < PKT_ETH_LEN:
            raise drop_error(DROP_MALFORMED)
        pkt_parse(b.p, b.n, &pi)
        return vxlan_src_port(b.p, &pi, &self.t)


cdef int _pkt_encap_prepare(const uint8_t *p, int64_t n, PktInfo *pi, const VxlanTmpl *t) noexcept nogil:
    """Parse an inner frame for encap: non-IP frames are carried as they are
    (VXLAN is L2), broken IP is not.  Then the MTU check."""
    cdef int rc = pkt_parse(p, n, pi)
    if rc == DROP_UNSUPPORTED and pi.ip_version == 0 and n >= PKT_ETH_LEN:
        memset(pi, 0, sizeof(PktInfo))
        rc = 0
    if rc:
        return rc
    if n + 36 > 0xffff:
        return DROP_MALFORMED
    return vxlan_check_mtu(pi, n, t)


cdef inline uint32_t _pkt_too_big_mtu(const PktInfo *pi, const VxlanTmpl *t) noexcept nogil:
    # the largest inner IP packet that still fits: underlay MTU - 36 - inner L2;
    # IPv6 hosts ignore a packet-too-big below the 1280 minimum (RFC 8200 5)
    cdef uint32_t mtu = <uint32_t>vxlan_inner_mtu(t.mtu, pi)
    if pi.ip_version == 6 and mtu < 1280:
        return 1280
    return mtu


def vxlan_encap(frame, VxlanTemplate template not None):
    """Encapsulate an inner Ethernet frame for the template's peer.  Raises
    PacketDropped (reason frag_needed, .reply = the ICMP too-big frame for the
    sender) when it would not fit the underlay MTU with DF set."""
    cdef _PktBuf b = _PktBuf(frame, VXLAN_OVERHEAD)
    cdef PktInfo pi
    cdef int rc
    cdef int64_t n
    cdef uint8_t reply[1400]
    rc = _pkt_encap_prepare(b.p, b.n, &pi, &template.t)
    if rc == DROP_FRAG_NEEDED:
        n = pkt_icmp_too_big(b.p, &pi, reply, sizeof(reply), _pkt_too_big_mtu(&pi, &template.t), NULL)
        raise drop_error(rc, "frame", (<char *>reply)[:n] if n else None)
    if rc:
        raise drop_error(rc)
    n = vxlan_encap_frame(b.p, b.n, &template.t, vxlan_src_port(b.p, &pi, &template.t))
    return (<char *>b.mem)[:n]


def vxlan_decap(frame, port=VXLAN_DEFAULT_PORT, vni=None):
    """Validate a VXLAN frame (IPv4 or IPv6 underlay, UDP `port`, I flag,
    reserved bits zero, `vni` if given) and return (vni, inner frame)."""
    cdef _PktBuf b = _PktBuf(frame)
    cdef VxlanDecapInfo d
    cdef int rc
    if not isinstance(port, int) or not 1 <= port <= 0xffff:
        raise ValueError(f"port must be an int in 1..65535, got {port!r}")
    if vni is not None and (not isinstance(vni, int) or not 0 <= vni < (1 << 24)):
        raise ValueError(f"vni must be None or an int in 0..2**24-1, got {vni!r}")
    rc = vxlan_decap_frame(b.p, b.n, port, -1 if vni is None else vni, &d)
    if rc:
        raise drop_error(rc)
    return d.vni, (<char *>b.p)[d.inner_off:d.inner_off + d.inner_len]
