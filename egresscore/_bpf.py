"""Classic BPF socket filters for PacketRing (SO_ATTACH_FILTER).

A program is a list of (code, jt, jf, k) instructions, the layout of the
kernel's struct sock_filter.  The helpers build the few filters the agent
needs (VXLAN port, destination host / port range, not our own outgoing
packets) without any external tool; bpf_compile() hands a tcpdump-style
expression to the system's libpcap (cffi, ABI mode: no build dependency) when
it is installed.  bpf_run() is a small interpreter used as a test oracle.

The helpers match IPv4 over untagged Ethernet (what the lab and the agent
carry); anything else is rejected.
"""
import ctypes.util
import ipaddress
import threading

# opcode fields (linux/bpf_common.h)
LD, LDX, ST, STX, ALU, JMP, RET, MISC = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
W, H, B = 0x00, 0x08, 0x10
IMM, ABS, IND, MEM, LEN, MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
JA, JEQ, JGT, JGE, JSET = 0x00, 0x10, 0x20, 0x30, 0x40
K, X, A = 0x00, 0x08, 0x10
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0)
TAX, TXA = 0x00, 0x80

SKF_AD_OFF = 0xFFFFF000  # -0x1000 as u32: ancillary data loads
SKF_NET_OFF = 0xFFF00000  # -0x100000: loads relative to the network header (14 on Ethernet)
SKF_LL_OFF = 0xFFE00000  # -0x200000: loads relative to the link-layer header
SKF_AD_PKTTYPE = 4
PACKET_OUTGOING = 4
ACCEPT = 0x40000  # snap length returned on a match (262144, as tcpdump)

ETH_P_IP = 0x0800
IPPROTO = {"tcp": 6, "udp": 17, "icmp": 1}


def _assemble(ops):
    """ops: (code, jt, jf, k) where jt/jf are 0 (next), 'accept' or 'drop';
    appends `ret #ACCEPT; ret #0` and resolves the labels to offsets."""
    n = len(ops)
    target = {"accept": n, "drop": n + 1}
    out = []
    for i, (code, jt, jf, k) in enumerate(ops):
        jt = target[jt] - i - 1 if isinstance(jt, str) else jt
        jf = target[jf] - i - 1 if isinstance(jf, str) else jf
        out.append((code, jt, jf, k))
    out.append((RET | K, 0, 0, ACCEPT))
    out.append((RET | K, 0, 0, 0))
    return out


def _ipv4_ports(lo, hi, proto):
    """IPv4 already checked; match proto (or tcp/udp) and dport in lo..hi."""
    ops = [(LD | B | ABS, 0, 0, 23)]
    if proto is not None:
        ops.append((JMP | JEQ | K, 0, "drop", proto))
    else:
        ops += [(JMP | JEQ | K, 1, 0, 6), (JMP | JEQ | K, 0, "drop", 17)]
    if lo is None:
        return ops
    ops += [
        (LD | H | ABS, 0, 0, 20),
        (JMP | JSET | K, "drop", 0, 0x1FFF),  # a later fragment has no ports
        (LDX | B | MSH, 0, 0, 14),            # x = IP header length
        (LD | H | IND, 0, 0, 16),             # 14 + 2: destination port
    ]
    if lo == hi:
        ops.append((JMP | JEQ | K, "accept", "drop", lo))
    else:
        ops += [(JMP | JGE | K, 0, "drop", lo), (JMP | JGT | K, "drop", "accept", hi)]
    return ops


def _port(value, name):
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFF:
        raise ValueError(f"{name} must be a port number 0..65535, got {value!r}")
    return value


def bpf_vxlan(port=8472):
    """IPv4 UDP to destination port `port` (VXLAN; 8472 as in Cilium, IANA's is
    4789), first fragments only."""
    return _assemble([(LD | H | ABS, 0, 0, 12), (JMP | JEQ | K, 0, "drop", ETH_P_IP)]
                     + _ipv4_ports(_port(port, "port"), port, 17))


def bpf_dst(host=None, ports=None, proto=None):
    """IPv4 to `host` (address or None: any), with `ports` (one port or an
    inclusive (lo, hi) range; None: any) on `proto` ('tcp', 'udp', a number,
    or None: tcp or udp when ports are given, any otherwise)."""
    ops = [(LD | H | ABS, 0, 0, 12), (JMP | JEQ | K, 0, "drop", ETH_P_IP)]
    if host is not None:
        try:
            addr = ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"host must be an IPv4 address, got {host!r}") from None
        ops += [(LD | W | ABS, 0, 0, 30), (JMP | JEQ | K, 0, "drop", int(addr))]
    if isinstance(proto, str):
        if proto not in IPPROTO:
            raise ValueError(f"proto must be one of {sorted(IPPROTO)} or a number, got {proto!r}")
        proto = IPPROTO[proto]
    elif proto is not None and not (isinstance(proto, int) and 0 <= proto <= 255):
        raise ValueError(f"proto must be 'tcp', 'udp', 'icmp' or 0..255, got {proto!r}")
    if ports is not None:
        if isinstance(ports, int):
            lo = hi = _port(ports, "ports")
        else:
            try:
                lo, hi = ports
            except (TypeError, ValueError):
                raise ValueError(f"ports must be a port or a (lo, hi) pair, got {ports!r}") from None
            lo, hi = _port(lo, "ports[0]"), _port(hi, "ports[1]")
            if lo > hi:
                raise ValueError(f"ports range {lo}..{hi} is empty")
        if proto is not None and proto not in (6, 17):
            raise ValueError(f"ports need proto tcp or udp, got {proto}")
        ops += _ipv4_ports(lo, hi, proto)
    elif proto is not None:
        ops += [(LD | B | ABS, 0, 0, 23), (JMP | JEQ | K, "accept", "drop", proto)]
    return _assemble(ops)


def bpf_not_outgoing():
    """Everything except packets this host sends (pkttype PACKET_OUTGOING).
    PacketRing(ignore_outgoing=True) does the same with a socket option."""
    return _assemble([(LD | W | ABS, 0, 0, SKF_AD_OFF + SKF_AD_PKTTYPE),
                      (JMP | JEQ | K, "drop", "accept", PACKET_OUTGOING)])


def _check(prog, name):
    prog = [tuple(int(v) for v in ins) for ins in prog]
    for ins in prog:
        if ins[0] == RET | A:
            raise ValueError(f"{name}: `ret a` cannot be combined; use helper or pcap programs")
    return prog


def _combine(progs, keep_drop):
    if not progs:
        raise ValueError("need at least one program")
    progs = [_check(p, f"program {i}") for i, p in enumerate(progs)]
    out = []
    for idx, prog in enumerate(progs):
        last = idx == len(progs) - 1
        start_next = len(out) + len(prog)
        for i, (code, jt, jf, k) in enumerate(prog):
            pos = len(out)
            if not last and code == RET | K and ((k == 0) != keep_drop):
                # hand the decision to the next program
                out.append((JMP | JA, 0, 0, start_next - pos - 1))
            else:
                out.append((code, jt, jf, k))
    return out


def bpf_any(*progs):
    """Accept what any of the programs accepts (first match wins)."""
    return _combine(progs, keep_drop=False)


def bpf_all(*progs):
    """Accept what every program accepts (snap length of the last one)."""
    return _combine(progs, keep_drop=True)


def bpf_run(prog, frame, pkttype=0, fanout=False):
    """Run a classic BPF program on frame (bytes, Ethernet) like the kernel:
    returns the accepted length (0: dropped), or with fanout=True the value
    returned as is (a fanout program's member index).  A test oracle, not a
    fast path."""
    a = x = 0
    mem = [0] * 16
    n = len(frame)
    pc = 0

    def load(off, size):
        if off >= SKF_AD_OFF:
            if off - SKF_AD_OFF == SKF_AD_PKTTYPE:
                return pkttype
            raise ValueError(f"ancillary load {off - SKF_AD_OFF} not supported")
        if off >= SKF_NET_OFF:
            off = off - SKF_NET_OFF + 14
        elif off >= SKF_LL_OFF:
            off -= SKF_LL_OFF
        if off + size > n:
            return None
        return int.from_bytes(frame[off:off + size], "big")

    while pc < len(prog):
        code, jt, jf, k = prog[pc]
        pc += 1
        cls = code & 0x07
        if cls in (LD, LDX):
            mode, size = code & 0xE0, {W: 4, H: 2, B: 1}[code & 0x18]
            if mode == IMM:
                v = k
            elif mode == LEN:
                v = n
            elif mode == MEM:
                v = mem[k]
            elif mode == ABS:
                v = load(k, size)
            elif mode == IND:
                v = load((x + k) & 0xFFFFFFFF, size)
            elif mode == MSH:
                v = load(k, 1)
                v = None if v is None else (v & 0xF) * 4
            else:
                raise ValueError(f"bad load mode {code:#x}")
            if v is None:
                return 0  # out-of-bounds load: the kernel drops the packet
            if cls == LD:
                a = v
            else:
                x = v
        elif cls == ST:
            mem[k] = a
        elif cls == STX:
            mem[k] = x
        elif cls == ALU:
            op, src = code & 0xF0, (x if code & X else k)
            if op in (DIV, MOD) and src == 0:
                return 0
            a = {ADD: lambda: a + src, SUB: lambda: a - src, MUL: lambda: a * src,
                 DIV: lambda: a // src, OR: lambda: a | src, AND: lambda: a & src,
                 LSH: lambda: a << (src & 31), RSH: lambda: a >> (src & 31),
                 NEG: lambda: -a, MOD: lambda: a % src, XOR: lambda: a ^ src}[op]()
            a &= 0xFFFFFFFF
        elif cls == JMP:
            op = code & 0xF0
            if op == JA:
                pc += k
                continue
            src = x if code & X else k
            cond = {JEQ: a == src, JGT: a > src, JGE: a >= src, JSET: bool(a & src)}[op]
            pc += jt if cond else jf
        elif cls == RET:
            v = a if (code & 0x18) == A else k
            return v if fanout else min(v, n)
        elif cls == MISC:
            if (code & 0xF8) == TAX:
                x = a
            else:
                a = x
    raise ValueError("program ran off its end")


# ---- libpcap (optional) ---------------------------------------------------

_PCAP_CDEF = """
typedef struct pcap pcap_t;
struct bpf_insn { unsigned short code; unsigned char jt; unsigned char jf; unsigned int k; };
struct bpf_program { unsigned int bf_len; struct bpf_insn *bf_insns; };
pcap_t *pcap_open_dead(int linktype, int snaplen);
int pcap_compile(pcap_t *p, struct bpf_program *fp, const char *str, int optimize,
                 unsigned int netmask);
void pcap_freecode(struct bpf_program *fp);
char *pcap_geterr(pcap_t *p);
void pcap_close(pcap_t *p);
"""
_pcap = None
_pcap_lock = threading.Lock()  # pcap_compile is not thread-safe in old libpcap


def _load_pcap():
    global _pcap
    if _pcap is None:
        try:
            import cffi
        except ImportError:
            _pcap = (None, None, "cffi is not installed")
            return _pcap
        ffi = cffi.FFI()
        ffi.cdef(_PCAP_CDEF)
        names = [ctypes.util.find_library("pcap"), "libpcap.so.1", "libpcap.so.0.8", "libpcap.so"]
        for name in names:
            if not name:
                continue
            try:
                _pcap = (ffi, ffi.dlopen(name), None)
                break
            except OSError:
                continue
        else:
            _pcap = (None, None, "libpcap is not installed (Debian: apt-get install libpcap0.8)")
    return _pcap


def pcap_available():
    """True when bpf_compile() can run (libpcap and cffi are present)."""
    return _load_pcap()[1] is not None


def bpf_compile(expression, snaplen=ACCEPT):
    """Compile a tcpdump-style expression for Ethernet with the system's
    libpcap.  Raises RuntimeError when libpcap is absent, ValueError on a
    bad expression."""
    if not isinstance(expression, str):
        raise TypeError(f"expression must be a str, got {type(expression).__name__}")
    ffi, lib, why = _load_pcap()
    if lib is None:
        raise RuntimeError(f"bpf_compile needs libpcap: {why}")
    with _pcap_lock:
        p = lib.pcap_open_dead(1, snaplen)  # DLT_EN10MB
        if p == ffi.NULL:
            raise MemoryError("pcap_open_dead failed")
        try:
            prog = ffi.new("struct bpf_program *")
            if lib.pcap_compile(p, prog, expression.encode(), 1, 0xFFFFFFFF) != 0:
                msg = ffi.string(lib.pcap_geterr(p)).decode(errors="replace")
                raise ValueError(f"expression {expression!r}: {msg}")
            try:
                return [(prog.bf_insns[i].code, prog.bf_insns[i].jt, prog.bf_insns[i].jf,
                         prog.bf_insns[i].k) for i in range(prog.bf_len)]
            finally:
                lib.pcap_freecode(prog)
        finally:
            lib.pcap_close(p)
