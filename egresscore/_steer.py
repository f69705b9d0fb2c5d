"""Steering frames to datapath workers: classic BPF fanout programs (PACKET_FANOUT_CBPF).

An agent with N workers opens N rings on every interface, joined in one
fanout group per interface (PacketRing(fanout_mode="cbpf")); the group's
program returns the index of the worker a frame goes to.  Each worker owns
a NAT table of its own with a disjoint slice of the NAT port range
(worker_slices), so:

- a reply (to an egress / node IP, destination port in the NAT range, an
  ICMP echo reply by its id, an ICMP error by the source port of the
  packet it quotes: our translated one) goes to the worker whose slice
  holds the port: the worker that made the mapping;
- a frame from a pod (on its veth, or inside VXLAN from a source node on
  the gateway) goes by a hash of its source address and port (an echo
  request by its id, an ICMP error a pod sends by its source and the
  quoted packet's destination port: the pod's own), so every connection of one (pod IP,
  pod port) is translated by one worker: endpoint-independent mapping
  holds, as it does with one table.

Anything else (ARP, other protocols, IPv4 later fragments, IPv6 with
extension headers, traffic that is not ours) goes to worker 0.  Loads are
relative to the link-layer header (SKF_LL_OFF), which the kernel sets on
every received frame whatever skb->data points at.

steer_pod / steer_underlay build the programs; steer_pod_model /
steer_underlay_model are the same rules in plain Python (the test oracle).
"""
import struct

from ._bpf import (
    ADD,
    ALU,
    AND,
    DIV,
    IMM,
    IND,
    JA,
    JEQ,
    JGE,
    JGT,
    JMP,
    JSET,
    LD,
    LDX,
    LSH,
    MEM,
    MISC,
    MOD,
    MUL,
    RET,
    RSH,
    SKF_LL_OFF,
    ST,
    TAX,
    TXA,
    XOR,
    B,
    H,
    K,
    W,
    X,
)

HASH_K1 = 0x9E3779B1
HASH_K2 = 0x85EBCA6B
MAX_WORKERS = 64

_V4, _V6 = 4, 6
_ECHO_REQ = {_V4: 8, _V6: 128}
_ECHO_REP = {_V4: 0, _V6: 129}
_ICMP_ERRORS = {_V4: (3, 11, 12), _V6: (1, 2, 3, 4)}
_ICMP_PROTO = {_V4: 1, _V6: 58}


def check_workers(workers):
    """workers checked: an int in 1..MAX_WORKERS."""
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be an integer in 1..{MAX_WORKERS}, not {workers!r}")
    return workers


def worker_slices(lo, hi, workers):
    """The NAT port range lo..hi cut into `workers` disjoint slices [(lo, hi), ...],
    each of `slice_size` ports (the last may be shorter)."""
    check_workers(workers)
    size = slice_size(lo, hi, workers)
    out = [(lo + k * size, min(hi, lo + (k + 1) * size - 1)) for k in range(workers)]
    if out[-1][0] > hi:
        raise ValueError(f"the NAT port range {lo}..{hi} is too small for {workers} workers")
    return out


def slice_size(lo, hi, workers):
    if not 0 < lo <= hi <= 0xFFFF:
        raise ValueError(f"NAT port range {lo}..{hi} is not a range of ports")
    return -(-(hi - lo + 1) // workers)


def steer_hash(addr, port, workers):
    """The forward rule: worker of (address word, port); addr is the low 32 bits of the address."""
    a = ((port * HASH_K1) & 0xFFFFFFFF) ^ addr
    return (((a * HASH_K2) & 0xFFFFFFFF) >> 16) % workers


def steer_slice(port, lo, hi, workers):
    """The reply rule: the worker whose slice holds `port` (0 outside the range)."""
    return (port - lo) // slice_size(lo, hi, workers) if lo <= port <= hi else 0


# ---- the programs -----------------------------------------------------------

class _Asm:
    """cBPF with labels: emit(code, jt, jf, k), jt/jf/JA k may name a label."""

    def __init__(self):
        self.ops = []
        self.labels = {}

    def label(self, name):
        self.labels[name] = len(self.ops)

    def emit(self, code, jt=0, jf=0, k=0):
        self.ops.append((code, jt, jf, k))

    def ret_a(self):
        self.emit(RET | 0x10)

    def ret(self, k):
        self.emit(RET | K, 0, 0, k)

    def goto(self, name):
        self.emit(JMP | JA, 0, 0, name)

    def program(self):
        out = []
        for i, (code, jt, jf, k) in enumerate(self.ops):
            if code == JMP | JA and isinstance(k, str):
                k = self.labels[k] - i - 1
            jt = self.labels[jt] - i - 1 if isinstance(jt, str) else jt
            jf = self.labels[jf] - i - 1 if isinstance(jf, str) else jf
            if not (0 <= jt <= 255 and 0 <= jf <= 255 and k >= 0):
                raise AssertionError(f"steering program: jump out of reach at {i}")
            out.append((code, jt, jf, k & 0xFFFFFFFF))
        return out


def _ind(a, size, off):
    a.emit(LD | size | IND, 0, 0, SKF_LL_OFF + off)


def _facts(a, proto_off, src_off, family):
    """M[0] = the protocol byte at proto_off, M[1] = the address word at src_off, M[3] = family."""
    for size, off, slot in ((B, proto_off, 0), (W, src_off, 1)):
        _ind(a, size, off)
        a.emit(ST, 0, 0, slot)
    a.emit(LD | IMM, 0, 0, family)
    a.emit(ST, 0, 0, 3)


def _parse(a, p):
    """X: the current frame's start (relative to the outer one).  Leaves
    M[0] = protocol, M[1] = source address word (the low 32 bits), M[3] =
    family and X such that the L4 header is at X + 14; anything else
    returns 0 (label "zero")."""
    _ind(a, H, 12)
    a.emit(JMP | JEQ | K, p + "v4", 0, 0x0800)
    a.emit(JMP | JEQ | K, p + "v6", "zero", 0x86DD)
    a.label(p + "v4")
    _ind(a, H, 20)
    a.emit(JMP | JSET | K, "zero", 0, 0x1FFF)       # a later fragment: no ports
    _facts(a, 23, 26, _V4)
    _ind(a, B, 14)
    a.emit(ALU | AND | K, 0, 0, 0x0F)
    a.emit(ALU | LSH | K, 0, 0, 2)
    a.emit(ALU | ADD | X)
    a.emit(MISC | TAX)
    a.goto(p + "l4")
    a.label(p + "v6")
    _facts(a, 20, 34, _V6)
    a.emit(MISC | TXA)
    a.emit(ALU | ADD | K, 0, 0, 40)
    a.emit(MISC | TAX)
    a.label(p + "l4")


def _quoted_l4(a, p):
    """X at an ICMP header (L4 at X + 14): X moved to the quoted packet's L4 (+ 14); A destroyed."""
    a.emit(LD | MEM, 0, 0, 3)
    a.emit(JMP | JEQ | K, p + "q6", 0, _V6)
    _ind(a, B, 22)                                  # the quoted IPv4 header's first byte
    a.emit(ALU | AND | K, 0, 0, 0x0F)
    a.emit(ALU | LSH | K, 0, 0, 2)
    a.emit(ALU | ADD | K, 0, 0, 8)
    a.emit(ALU | ADD | X)
    a.emit(MISC | TAX)
    a.goto(p + "qdone")
    a.label(p + "q6")
    a.emit(MISC | TXA)
    a.emit(ALU | ADD | K, 0, 0, 48)
    a.emit(MISC | TAX)
    a.label(p + "qdone")


def _icmp_dispatch(a, p):
    """A = protocol: to p+"icmp" when it is this family's ICMP, else zero."""
    a.emit(JMP | JEQ | K, p + "is1", 0, 1)
    a.emit(JMP | JEQ | K, p + "is58", "zero", 58)
    a.label(p + "is1")
    a.emit(LD | MEM, 0, 0, 3)
    a.emit(JMP | JEQ | K, p + "icmp", "zero", _V4)
    a.label(p + "is58")
    a.emit(LD | MEM, 0, 0, 3)
    a.emit(JMP | JEQ | K, p + "icmp", "zero", _V6)


def _types(a, p, kinds):
    """A = ICMP type: for each (label, {family: types}) jump there when A is one of the family's types."""
    a.emit(LD | MEM, 0, 0, 3)
    a.emit(JMP | JEQ | K, p + "t6", 0, _V6)
    for fam in (_V4, _V6):
        if fam == _V6:
            a.label(p + "t6")
        _ind(a, B, 14)
        for target, table in kinds:
            for t in table[fam]:
                a.emit(JMP | JEQ | K, target, 0, t)
        a.ret(0)


def _forward(a, p, workers):
    """The forward rule on the parsed packet (see the module docstring)."""
    a.emit(LD | MEM, 0, 0, 0)
    a.emit(JMP | JEQ | K, p + "ports", 0, 6)
    a.emit(JMP | JEQ | K, p + "ports", 0, 17)
    _icmp_dispatch(a, p)
    a.label(p + "icmp")
    _types(a, p, [(p + "echo", {f: (t,) for f, t in _ECHO_REQ.items()}), (p + "err", _ICMP_ERRORS)])
    a.label(p + "echo")
    _ind(a, H, 18)
    a.goto("hash_src")
    a.label(p + "err")
    _quoted_l4(a, p)
    _ind(a, H, 16)                                   # the quoted destination port: the pod's
    a.goto("hash_src")                               # with the error's source: the pod
    a.label(p + "ports")
    _ind(a, H, 14)
    a.goto("hash_src")


def _common_tail(a, lo, hi, workers):
    a.label("hash_src")                              # A = port, M[1] = address word
    a.emit(ALU | MUL | K, 0, 0, HASH_K1)
    a.emit(MISC | TAX)
    a.emit(LD | MEM, 0, 0, 1)
    a.emit(ALU | XOR | X)
    a.emit(ALU | MUL | K, 0, 0, HASH_K2)
    a.emit(ALU | RSH | K, 0, 0, 16)
    a.emit(ALU | MOD | K, 0, 0, workers)
    a.ret_a()
    if lo is not None:
        a.label("slice")                             # A = port: its slice's worker, 0 outside the range
        a.emit(JMP | JGE | K, 0, "zero", lo)
        a.emit(JMP | JGT | K, "zero", 0, hi)
        a.emit(ALU | ADD | K, 0, 0, (-lo) & 0xFFFFFFFF)
        a.emit(ALU | DIV | K, 0, 0, slice_size(lo, hi, workers))
        a.ret_a()
    a.label("zero")
    a.ret(0)


def steer_pod(workers):
    """The program for a pod veth's group: every frame is a pod's, steered by the forward rule."""
    check_workers(workers)
    a = _Asm()
    a.emit(LDX | IMM, 0, 0, 0)
    _parse(a, "o_")
    _forward(a, "o_", workers)
    _common_tail(a, None, None, workers)
    return a.program()


def steer_underlay(workers, nat_port_range, vxlan_port=8472):
    """The program for the underlay's group: VXLAN (to vxlan_port) by the
    forward rule on its inner frame, everything else by the reply rule."""
    check_workers(workers)
    lo, hi = nat_port_range
    slice_size(lo, hi, workers)
    a = _Asm()
    a.emit(LDX | IMM, 0, 0, 0)
    _parse(a, "o_")
    a.emit(LD | MEM, 0, 0, 0)
    a.emit(JMP | JEQ | K, "o_udp", 0, 17)
    a.emit(JMP | JEQ | K, "o_ports", 0, 6)
    _icmp_dispatch(a, "o_")
    a.label("o_icmp")
    _types(a, "o_", [("o_echo", {f: (t,) for f, t in _ECHO_REP.items()}), ("o_err", _ICMP_ERRORS)])
    a.label("o_echo")
    _ind(a, H, 18)
    a.goto("slice")
    a.label("o_err")
    _quoted_l4(a, "o_")
    _ind(a, H, 14)                                   # the quoted source port: ours, translated
    a.goto("slice")
    a.label("o_udp")
    _ind(a, H, 16)
    a.emit(JMP | JEQ | K, 0, "o_dport", vxlan_port)
    a.emit(MISC | TXA)                               # the inner frame: after UDP (8) and VXLAN (8)
    a.emit(ALU | ADD | K, 0, 0, 30)
    a.emit(MISC | TAX)
    _parse(a, "i_")
    _forward(a, "i_", workers)
    a.label("o_ports")
    _ind(a, H, 16)
    a.label("o_dport")
    a.goto("slice")
    _common_tail(a, lo, hi, workers)
    return a.program()


# ---- the same rules in Python (the oracle) --------------------------------------

def _l3(frame, off):
    """(family, proto, src word, dst word, L4 offset) of the packet at frame[off:] (Ethernet), or None."""
    if len(frame) < off + 14:
        return None
    et = struct.unpack_from("!H", frame, off + 12)[0]
    ip = off + 14
    if et == 0x0800 and len(frame) >= ip + 20:
        if struct.unpack_from("!H", frame, ip + 6)[0] & 0x1FFF:
            return None
        ihl = (frame[ip] & 0xF) * 4
        return _V4, frame[ip + 9], struct.unpack_from("!I", frame, ip + 12)[0], \
            struct.unpack_from("!I", frame, ip + 16)[0], ip + ihl
    if et == 0x86DD and len(frame) >= ip + 40:
        return _V6, frame[ip + 6], struct.unpack_from("!I", frame, ip + 20)[0], \
            struct.unpack_from("!I", frame, ip + 36)[0], ip + 40
    return None


def _u16(frame, off):
    if off + 2 > len(frame):
        raise IndexError
    return struct.unpack_from("!H", frame, off)[0]


def _quoted(frame, fam, l4):
    """The quoted packet's L4 offset in an ICMP error at l4."""
    q = l4 + 8
    return q + ((frame[q] & 0xF) * 4 if fam == _V4 else 40)


def _forward_model(frame, off, workers):
    p = _l3(frame, off)
    if p is None:
        return 0
    fam, proto, src, _dst, l4 = p
    if proto in (6, 17):
        return steer_hash(src, _u16(frame, l4), workers)
    if proto != _ICMP_PROTO[fam]:
        return 0
    t = frame[l4]
    if t == _ECHO_REQ[fam]:
        return steer_hash(src, _u16(frame, l4 + 4), workers)
    if t in _ICMP_ERRORS[fam]:
        return steer_hash(src, _u16(frame, _quoted(frame, fam, l4) + 2), workers)
    return 0


def steer_pod_model(frame, workers):
    """steer_pod's worker for `frame` (bytes, Ethernet), in Python."""
    try:
        return _forward_model(frame, 0, workers)
    except IndexError:
        return 0   # a short frame: the kernel's load fails and the program returns 0


def steer_underlay_model(frame, workers, nat_port_range, vxlan_port=8472):
    """steer_underlay's worker for `frame`, in Python."""
    lo, hi = nat_port_range
    try:
        p = _l3(frame, 0)
        if p is None:
            return 0
        fam, proto, _src, _dst, l4 = p
        if proto == 17 and _u16(frame, l4 + 2) == vxlan_port:
            return _forward_model(frame, l4 + 16, workers)
        if proto in (6, 17):
            return steer_slice(_u16(frame, l4 + 2), lo, hi, workers)
        if proto != _ICMP_PROTO[fam]:
            return 0
        t = frame[l4]
        if t == _ECHO_REP[fam]:
            return steer_slice(_u16(frame, l4 + 4), lo, hi, workers)
        if t in _ICMP_ERRORS[fam]:
            return steer_slice(_u16(frame, _quoted(frame, fam, l4)), lo, hi, workers)
        return 0
    except IndexError:
        return 0
