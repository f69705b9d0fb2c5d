"""FilesSource: the cluster and policy files behind the Source interface, all or nothing on reload."""
import shutil
import threading

import pytest

from egresscore.agent.feed import CompilingSink, SourceRunner, SourceStartError
from egresscore.sources.files import FilesSource


def _follow(src):
    sink = CompilingSink()
    stop = threading.Event()
    t = threading.Thread(target=src.run, args=(sink, stop), daemon=True)
    t.start()
    assert sink.wait(lambda: sink.version > 0)
    return sink, stop, t


def test_files_snapshot_reload_and_a_bad_reload_kept_out(tmp_path):
    pol = tmp_path / "policies"
    pol.mkdir()
    shutil.copy("examples/egress-sample.yaml", pol / "sample.yaml")
    src = FilesSource("examples/cluster.yaml", [str(pol)])
    sink, stop, t = _follow(src)
    try:
        assert sink.egress_map.lookup("10.0.1.93", "203.0.113.10") is not None
        (pol / "broken.yaml").write_text("kind: CiliumEgressGatewayPolicy\n")
        src.request_reload()
        assert sink.wait(lambda: sink.errors)
        key, err = sink.errors[0]
        assert key == "files" and "broken.yaml" in str(err)
        assert sink.egress_map.lookup("10.0.1.93", "203.0.113.10") is not None, "the state in force stays"
        (pol / "broken.yaml").unlink()
        (pol / "sample.yaml").unlink()
        src.request_reload()
        assert sink.wait(lambda: sink.stats.snapshot()["resyncs"] == 2)
        assert sink.egress_map.lookup("10.0.1.93", "203.0.113.10") is None, "a removed file removes its policy"
    finally:
        stop.set()
        t.join(5)


def test_a_bad_file_at_start_is_a_start_error(tmp_path):
    bad = tmp_path / "cluster.yaml"
    bad.write_text("nodes: 3\n")
    with pytest.raises(SourceStartError, match="cluster.yaml"):
        SourceRunner(FilesSource(str(bad), ["examples/egress-sample.yaml"])).start(5)
