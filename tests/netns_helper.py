"""A throwaway network namespace with a veth pair (both ends inside it), for tests that read a host with pyroute2.

No interface is ever moved to or bridged with the root namespace; the namespace
is removed on exit, also when the test fails (egresscore.lab._ns.scratch).
"""

import contextlib
import os

PREFIX = "egc-ctl-"


@contextlib.contextmanager
def dummy_netns(tag, addresses, *, ifname="eth0", gateway=None):
    from pyroute2 import NetNS

    from egresscore.lab import _ns

    name = f"{PREFIX}{tag}-{os.getpid()}"
    with _ns.scratch(name):
        with NetNS(name) as ns:
            # this kernel has no dummy driver: a veth pair whose both ends stay here
            ns.link("add", ifname=ifname, kind="veth", peer={"ifname": ifname + "p"})
            idx = ns.link_lookup(ifname=ifname)[0]
            for a in addresses:
                ip, plen = a.split("/")
                ns.addr("add", index=idx, address=ip, prefixlen=int(plen))
            ns.link("set", index=idx, state="up")
            ns.link("set", index=ns.link_lookup(ifname=ifname + "p")[0], state="up")
            if gateway:
                ns.route("add", dst="0.0.0.0/0", gateway=gateway, oif=idx)
        yield name
