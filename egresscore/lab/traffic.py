"""A small traffic kit: external servers that record who they saw, and pod clients.

Servers (one process per external-server namespace) answer an HTTP-like GET on
TCP port 80 with the source address they saw, echo UDP port 7, and log ICMP
echo requests (the kernel answers the ping itself), IPv4 and IPv6 alike (each
socket takes the family of its address).  Clients send a bounded
number of packets and give up after a bounded time.  Everything here runs in a
namespace through Lab.call / Lab.spawn.
"""
import hashlib
import os
import selectors
import socket
import struct
import threading
import time

HTTP_PORT = 80
UDP_PORT = 7
MAX_RECORDS = 100_000
MAX_BYTES = 256 << 20  # GET /bytes/N cap


def _family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _pattern(n):
    """N deterministic bytes (GET /bytes/N), cheap to produce and to check."""
    block = hashlib.sha256(b"egresscore-lab").digest() * 2048  # 64 KiB
    whole, rest = divmod(n, len(block))
    return block * whole + block[:rest]


def payload_sha256(n):
    return hashlib.sha256(_pattern(n)).hexdigest()


# -- server (runs in the server namespace) -------------------------------------------
def serve(conn, name, addresses, max_seconds):
    """Serve until told to stop or max_seconds pass; answer control messages on `conn`."""
    records = []
    lock = threading.Lock()

    def record(proto, src, sport, dst):
        with lock:
            if len(records) < MAX_RECORDS:
                records.append({"server": name, "proto": proto, "src": src, "sport": sport, "dst": dst})

    sel = selectors.DefaultSelector()
    socks = []
    for addr in addresses:
        t = socket.socket(_family(addr), socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind((addr, HTTP_PORT))
        t.listen(64)
        u = socket.socket(_family(addr), socket.SOCK_DGRAM)
        u.bind((addr, UDP_PORT))
        sel.register(t, selectors.EVENT_READ, "tcp")
        sel.register(u, selectors.EVENT_READ, "udp")
        socks += [t, u]
    icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sel.register(icmp, selectors.EVENT_READ, "icmp")
    if any(":" in a for a in addresses):
        icmp6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        icmp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)  # the destination address
        sel.register(icmp6, selectors.EVENT_READ, "icmp6")
    sel.register(conn, selectors.EVENT_READ, "ctl")
    conn.send("ready")
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            sock, kind = key.fileobj, key.data
            if kind == "tcp":
                c, (src, sport, *_) = sock.accept()
                dst = c.getsockname()[0]
                record("tcp", src, sport, dst)
                threading.Thread(target=_http, args=(c, src), daemon=True).start()
            elif kind == "udp":
                data, (src, sport, *_) = sock.recvfrom(65535)
                record("udp", src, sport, sock.getsockname()[0])
                sock.sendto(data, (src, sport))
            elif kind == "icmp":
                data = sock.recv(65535)
                ihl = (data[0] & 0x0F) * 4
                if len(data) > ihl and data[ihl] == 8:  # echo request
                    record("icmp", socket.inet_ntoa(data[12:16]), 0, socket.inet_ntoa(data[16:20]))
            elif kind == "icmp6":  # the ICMPv6 message alone; the destination from IPV6_PKTINFO
                data, anc, _, (src, *_) = sock.recvmsg(65535, 256)
                dst = next((socket.inet_ntop(socket.AF_INET6, d[:16]) for lvl, typ, d in anc
                            if lvl == socket.IPPROTO_IPV6 and typ == socket.IPV6_PKTINFO), "")
                if data[:1] == b"\x80":  # echo request
                    record("icmp", src, 0, dst)
            else:
                try:
                    cmd = conn.recv()
                except EOFError:
                    return
                if cmd == "seen":
                    with lock:
                        conn.send(list(records))
                elif cmd == "clear":
                    with lock:
                        records.clear()
                    conn.send("ok")
                elif cmd == "stop":
                    conn.send("ok")
                    return


def _http(c, src):
    """One HTTP/1.0 exchange: `GET /` -> the source address seen; `GET /bytes/N` -> N pattern bytes."""
    try:
        c.settimeout(5.0)
        req = b""
        while b"\r\n\r\n" not in req and len(req) < 8192:
            chunk = c.recv(4096)
            if not chunk:
                break
            req += chunk
        head_raw, _, body_start = req.partition(b"\r\n\r\n")
        method, _, rest = head_raw.partition(b" ")
        path = rest.split(b" ", 1)[0].decode("ascii", "replace") or "/"
        length = 0
        for line in head_raw.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length" and value.strip().isdigit():
                length = int(value.strip())
        if method == b"PUT" and 0 <= length <= MAX_BYTES:  # upload: reply with the body's sha256
            h, got = hashlib.sha256(body_start[:length]), len(body_start[:length])
            while got < length:
                chunk = c.recv(min(1 << 20, length - got))
                if not chunk:
                    break
                h.update(chunk)
                got += len(chunk)
            body = f"{got} {h.hexdigest()}\n".encode()
            head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\n"
        elif path.startswith("/bytes/") and path[7:].isdigit() and int(path[7:]) <= MAX_BYTES:
            body = _pattern(int(path[7:]))
            head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\nX-SHA256: {hashlib.sha256(body).hexdigest()}\r\n"
        else:
            body = (src + "\n").encode()
            head = f"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        c.sendall(head.encode() + b"\r\n" + body)
    except OSError:
        pass
    finally:
        c.close()


class ServerSet:
    """The external servers of a lab, one process per server namespace."""

    def __init__(self, lab, max_seconds=600.0, ready_timeout=10.0):
        from . import _ns

        self._procs = {}
        self._conns = {}
        try:
            for name, server in lab.servers.items():
                parent, child = _ns._fork.Pipe()
                addresses = (*server.addresses, *getattr(server, "addresses6", ()))
                proc = _ns.spawn(server.ns, serve, child, name, addresses, max_seconds)
                child.close()
                self._procs[name], self._conns[name] = proc, parent
            for name, parent in self._conns.items():
                if not parent.poll(ready_timeout) or parent.recv() != "ready":
                    raise RuntimeError(f"server {name} did not start in {ready_timeout} s")
        except BaseException:
            self.stop()
            raise

    def _ask(self, cmd, timeout=5.0):
        out = {}
        for name, c in self._conns.items():
            c.send(cmd)
            if not c.poll(timeout):
                raise TimeoutError(f"server {name} did not answer {cmd!r}")
            out[name] = c.recv()
        return out

    def seen(self, proto=None, dst=None):
        """Records {server, proto, src, sport, dst} of what the servers received."""
        recs = [r for rs in self._ask("seen").values() for r in rs]
        return [r for r in recs if (proto is None or r["proto"] == proto) and (dst is None or r["dst"] == dst)]

    def sources(self, proto=None, dst=None):
        """The set of source addresses the servers saw (for `proto` to `dst`)."""
        return {r["src"] for r in self.seen(proto, dst)}

    def clear(self):
        self._ask("clear")

    def stop(self):
        for name, c in list(self._conns.items()):
            try:
                c.send("stop")
                c.poll(2.0)
            except (OSError, EOFError, BrokenPipeError):
                pass
            c.close()
        self._conns.clear()
        for proc in self._procs.values():
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        self._procs.clear()


# -- clients (run in a pod namespace) -----------------------------------------------
def _read_reply(s, timeout):
    """Everything the server sends until it closes (HTTP/1.0), within timeout."""
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def tcp_request(dst, port=HTTP_PORT, timeout=3.0, path="/"):
    """GET `path` from dst:port; for `/` returns the source address the server saw."""
    with socket.create_connection((dst, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {dst}\r\n\r\n".encode())
        data = _read_reply(s, timeout)
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200"):
        raise ConnectionError(f"bad reply from {dst}:{port}: {head[:80]!r}")
    return body.decode().strip() if path == "/" else body


def tcp_download(dst, n, port=HTTP_PORT, timeout=30.0):
    """Fetch n pattern bytes; returns (bytes received, sha256 matches)."""
    body = tcp_request(dst, port, timeout, path=f"/bytes/{int(n)}")
    return len(body), hashlib.sha256(body).hexdigest() == payload_sha256(n)


def tcp_upload(dst, n, port=HTTP_PORT, timeout=30.0):
    """PUT n pattern bytes; returns (bytes the server received, its sha256 matches)."""
    body = _pattern(int(n))
    with socket.create_connection((dst, port), timeout=timeout) as s:
        s.sendall(f"PUT /sha256 HTTP/1.0\r\nHost: {dst}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        data = _read_reply(s, timeout)
    got, digest = data.partition(b"\r\n\r\n")[2].decode().split()
    return int(got), digest == hashlib.sha256(body).hexdigest()


def udp_echo(dst, port=UDP_PORT, count=3, timeout=2.0, size=32):
    """Send `count` datagrams of `size` bytes; return how many echoes came back."""
    got = set()
    with socket.socket(_family(dst), socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        for seq in range(count):
            msg = struct.pack("!I", seq) + b"x" * max(0, size - 4)
            s.sendto(msg, (dst, port))
            try:
                while True:
                    data, _ = s.recvfrom(65535)
                    got.add(struct.unpack("!I", data[:4])[0])
                    if seq in got:
                        break
            except socket.timeout:
                pass
    return len(got)


def _icmp_checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def ping(dst, count=3, timeout=2.0):
    """Send `count` ICMP (ICMPv6 for an IPv6 dst) echo requests to dst; return how many replies came back."""
    ident = os.getpid() & 0xFFFF
    got = 0
    v6 = ":" in dst
    request, reply = (128, 129) if v6 else (8, 0)
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    with socket.socket(_family(dst), socket.SOCK_RAW, proto) as s:
        for seq in range(count):
            body = b"egresscore-lab"
            hdr = struct.pack("!BBHHH", request, 0, 0, ident, seq)
            csum = 0 if v6 else _icmp_checksum(hdr + body)  # the kernel sums ICMPv6 (it covers a pseudo-header)
            s.sendto(struct.pack("!BBHHH", request, 0, csum, ident, seq) + body, (dst, 0))
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    data, (src, *_) = s.recvfrom(65535)
                except socket.timeout:
                    break
                ihl = 0 if v6 else (data[0] & 0x0F) * 4  # IPv6 raw sockets give the ICMPv6 message alone
                if len(data) < ihl + 8:
                    continue
                typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
                if typ == reply and rid == ident and rseq == seq and src == dst:
                    got += 1
                    break
    return got


def wait_listening(port, timeout=10.0):
    """Wait until a TCP socket listens on `port` in this namespace (read from /proc/net/tcp,
    without connecting: a probe would use up a one-shot server)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table) as f:
                    lines = f.readlines()[1:]
            except FileNotFoundError:  # IPv6 disabled
                continue
            for line in lines:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on TCP port {port} after {timeout} s")


# -- load (bounded in packets and seconds) ---------------------------------------------
def udp_flood(dst, port, seconds=2.0, size=18, max_packets=5_000_000):
    """Send `size`-byte UDP datagrams to dst:port as fast as possible; return the count sent.

    18 bytes of payload make 64-byte Ethernet frames (with FCS).  Stops after
    `seconds` or `max_packets`, whichever comes first.
    """
    with socket.socket(_family(dst), socket.SOCK_DGRAM) as s:
        s.connect((dst, port))
        msg, sent, send = b"\0" * size, 0, s.send
        deadline = time.monotonic() + seconds
        while sent < max_packets and time.monotonic() < deadline:
            for _ in range(256):
                try:
                    send(msg)
                    sent += 1
                except (BlockingIOError, ConnectionRefusedError):
                    pass
    return sent


def udp_count(addr, port, seconds=10.0, idle=0.5, ready=None):
    """Count datagrams arriving on addr:port; stop `idle` s after the last one (or after `seconds`).

    Returns (packets, seconds between the first and the last).
    """
    with socket.socket(_family(addr), socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((addr, port))
        s.settimeout(idle)
        if ready is not None:
            ready.send("ready")
        buf, n, first, last = bytearray(2048), 0, None, None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                s.recv_into(buf)
            except socket.timeout:
                if n:
                    break
                continue
            n += 1
            last = time.monotonic()
            if first is None:
                first = last
    return n, (last - first) if n > 1 else 0.0


def udp_stream(dst, port, seconds=5.0, interval=0.01, sport=0):
    """One datagram every `interval` s for `seconds` (bounded), each carrying its
    sequence number, from one socket (one flow); returns how many were sent."""
    n = min(int(seconds / interval), 100_000)
    with socket.socket(_family(dst), socket.SOCK_DGRAM) as s:
        if sport:
            s.bind(("::" if ":" in dst else "0.0.0.0", sport))
        start = time.monotonic()
        for i in range(n):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                s.sendto(i.to_bytes(4, "big"), (dst, port))
            except OSError:
                pass
    return n


def datagrams_for(conn, addr, port, seconds):
    """Yield (data, source IP, source port) of every datagram (up to 64 bytes)
    arriving on addr:port for `seconds`, after sending "ready" over `conn`."""
    with socket.socket(_family(addr), socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((addr, port))
        s.settimeout(0.2)
        conn.send("ready")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data, (src, sport, *_) = s.recvfrom(64)
            except socket.timeout:
                continue
            yield data, src, sport


def udp_arrivals(conn, addr, port, seconds):
    """Record every datagram arriving on addr:port for `seconds`: sends
    "ready", then [(CLOCK_MONOTONIC time, source IP, sequence number)] over
    `conn` (the clock is the machine's, so times compare across namespaces)."""
    conn.send([(time.monotonic(), src, int.from_bytes(data[:4], "big"))
               for data, src, _ in datagrams_for(conn, addr, port, seconds)])


# -- measuring (peer generators and counters for the lab benchmarks) ------------------
def udp_frame(src_mac, dst_mac, src_ip, dst_ip, sport, dport, payload=18):
    """One Ethernet + IPv4 + UDP frame (UDP checksum 0, IPv4 checksum set): what
    trafgen repeats.  18 bytes of payload make a 64-byte frame with FCS."""
    mac = lambda m: bytes.fromhex(m.replace(":", ""))  # noqa: E731
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + payload, 0, 0x4000, 64, 17, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    ip = ip[:10] + struct.pack("!H", _icmp_checksum(ip)) + ip[12:]
    udp = struct.pack("!HHHH", sport, dport, 8 + payload, 0)
    return mac(dst_mac) + mac(src_mac) + b"\x08\x00" + ip + udp + bytes(payload)


def udp_frame6(src_mac, dst_mac, src_ip, dst_ip, sport, dport, payload=0):
    """One Ethernet + IPv6 + UDP frame, UDP checksum set (IPv6 forbids a zero one).  With no
    payload it is the smallest IPv6 UDP frame: 62 bytes, 66 with FCS (the IPv6 header is 20
    bytes longer than IPv4's, so there is no 64-byte one)."""
    mac = lambda m: bytes.fromhex(m.replace(":", ""))  # noqa: E731
    src, dst = socket.inet_pton(socket.AF_INET6, src_ip), socket.inet_pton(socket.AF_INET6, dst_ip)
    length = 8 + payload
    body = bytes(payload)
    pseudo = src + dst + struct.pack("!IxxxB", length, 17)
    csum = _icmp_checksum(pseudo + struct.pack("!HHHH", sport, dport, length, 0) + body) or 0xFFFF
    udp = struct.pack("!HHHH", sport, dport, length, csum) + body
    ip6 = struct.pack("!IHBB", 6 << 28, length, 17, 64) + src + dst
    return mac(dst_mac) + mac(src_mac) + b"\x86\xdd" + ip6 + udp


def trafgen_config(frame):
    """A trafgen packet configuration that sends `frame` over and over."""
    return "{ " + ", ".join(f"0x{b:02x}" for b in frame) + " }\n"


def link_counters(ifname):
    """(rx_packets, tx_packets, rx_bytes, tx_bytes, rx_dropped) of an interface of this namespace."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        link = ipr.get_links(ifname=ifname)[0]
    st = link.get_attr("IFLA_STATS64")
    return (st["rx_packets"], st["tx_packets"], st["rx_bytes"], st["tx_bytes"], st["rx_dropped"])


def _proc_stat_cpu():
    """The all-CPU line of /proc/stat as ints (user, nice, system, idle, iowait, irq, softirq, steal, ...)."""
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:]]


def cpu_seconds():
    """Machine CPU seconds spent so far in user, system and softirq, all CPUs (/proc/stat).

    Not per namespace: whatever else runs on the machine is counted too.
    """
    user, _nice, system, _idle, _iowait, _irq, softirq = _proc_stat_cpu()[:7]
    return (user + system + softirq) / os.sysconf("SC_CLK_TCK")


def stolen_seconds():
    """CPU seconds the hypervisor has taken from this VM so far, all CPUs (/proc/stat steal).

    A busy vCPU that the host runs something else on makes no progress and
    its thread's CPU clock does not advance: wall-clock rates drop while
    CPU per frame does not, so multi-core figures print this beside them.
    """
    fields = _proc_stat_cpu()
    return (fields[7] if len(fields) > 7 else 0) / os.sysconf("SC_CLK_TCK")


def ping_times(output):
    """Round-trip times in ms from iputils ping's per-reply lines (`time=0.123 ms`)."""
    times = []
    for line in output.splitlines():
        at = line.find(" time=")
        if at >= 0:
            times.append(float(line[at + 6:].split()[0]))
    return times
