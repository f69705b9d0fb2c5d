"""Write nat_state_v3.bin.gz and nat_state_v3.json: a format 3 NAT state file
(80-byte entries, as main wrote it before format 4) and the flows in it.

Run with a format-3 build of egresscore on the path (main before the
56-byte entries).  Made with main at b5bb3f9 (the tree of `git archive
b5bb3f9 egresscore` and main's build of it, egresscore/_core*.so):
    PYTHONPATH=/that/tree python tests/data/make_nat_state_v3.py tests/data
The file is unsealed (the table is dropped, not sealed); the test rebases
its boot id and monotonic times onto the running boot before adopting it."""
import gzip
import json
import os
import sys
import tempfile

from egresscore import NatTable

out = sys.argv[1]
flows = []
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "v3.nat")
    t = NatTable(["198.51.100.1", "198.51.100.2", "2001:db8:e::1"], capacity=256, state_path=path)
    for i in range(12):
        src, dst = f"10.0.0.{i + 1}", "203.0.113.10"
        proto = ("tcp", "udp")[i % 2]
        # one pod port for all: after the first, the ports are not the pod's
        eip, xport = t.translate(src, 40000, dst, 80 + i, proto,
                                 egress_ip=("198.51.100.1", "198.51.100.2")[i % 4 // 2], length=100 + i)
        t.reverse(dst, 80 + i, eip, xport, proto, length=60)
        flows.append([src, 40000, dst, 80 + i, proto, eip, xport])
    for i in range(5):
        src, dst = f"fd00::{i + 1}", "2001:db8:99::10"
        eip, xport = t.translate(src, 50000, dst, 443, "tcp", egress_ip="2001:db8:e::1", length=120)
        flows.append([src, 50000, dst, 443, "tcp", eip, xport])
    assert len(t) == 17
    del t
    with open(path, "rb") as f:
        raw = f.read()
assert int.from_bytes(raw[8:12], "little") == 3, "not a format 3 build"
with gzip.GzipFile(os.path.join(out, "nat_state_v3.bin.gz"), "wb", mtime=0) as f:
    f.write(raw)
with open(os.path.join(out, "nat_state_v3.json"), "w") as f:
    f.write('{"capacity": 256, "flows": [\n  ' + ",\n  ".join(map(json.dumps, flows)) + "]}\n")
