"""Flow-log sinks: JSON lines (stdout, rotating file), callback, enrichment,
and the drain/writer threads that never let a slow sink stall the datapath."""
import io
import json
import logging
import os
import time

import pytest

from egresscore import (
    CallbackSink,
    Compiler,
    Enricher,
    FlowLog,
    FlowLogger,
    JsonLinesSink,
    NatTable,
    load_cluster,
    load_policies,
    nat_tuples,
    records_to_dicts,
)

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, "..", "examples")
EGRESS = "192.168.1.3"
APP1 = "10.0.1.93"
SERVER = "203.0.113.10"


@pytest.fixture
def compiler():
    cluster = load_cluster(os.path.join(EXAMPLES, "cluster.yaml"))
    policies = load_policies(os.path.join(EXAMPLES, "egress-sample.yaml")).policies
    return Compiler(cluster, policies, node="node3")


def traffic(t, n_flows=1, now=10.0):
    for k in range(n_flows):
        xip, xport = t.translate(APP1, 40000 + k, SERVER, 80, "tcp", tcp_flags="S", now=now,
                                 length=60)
        t.reverse(SERVER, 80, xip, xport, "tcp", tcp_flags="SA", now=now, length=60)
    t.flush(now=now + 1)


def test_records_to_dicts_and_enrichment(compiler):
    t = NatTable([EGRESS], capacity=16, seed=1)
    fl = FlowLog(64)
    t.flow_log = fl
    traffic(t)
    fl._drop(4, APP1, 5353, "203.0.113.77", 53, 17, now=12.0)      # no_gateway
    dicts = records_to_dicts(fl.drain(), node="node3", enrich=Enricher(compiler=compiler))
    start, end, drop = dicts
    assert start["kind"] == "start" and start["node"] == "node3"
    assert (start["src"], start["sport"], start["dst"], start["dport"], start["proto"]) == (
        APP1, 40000, SERVER, 80, "tcp")
    assert start["egress_ip"] == EGRESS and start["policy"] == "egress-sample"
    assert start["gateway"] == "192.168.1.3"
    assert start["pod"] == {"namespace": "default", "name": "app1", "labels": {"app": "app1"}}
    assert end["reason"] == "eviction" and end["duration"] == 1.0
    assert (end["packets_out"], end["bytes_out"], end["packets_in"], end["bytes_in"]) == (1, 60, 1, 60)
    assert drop["kind"] == "drop" and drop["reason"] == "no_gateway" and "egress_ip" not in drop
    assert start["time"].endswith("Z") and "T" in start["time"]
    json.dumps(dicts)           # JSON-able


def test_enricher_excluded_cidr_and_unknown_pod(compiler):
    e = Enricher(compiler=compiler)
    assert e.policy(APP1, "203.0.113.200") is None          # excluded upper half
    assert e.policy(APP1, "198.51.100.1") is None           # not a destination
    assert e.policy("10.0.2.44", SERVER) is None            # app2: not selected
    d = e({"src": "10.9.9.9", "dst": SERVER})
    assert "pod" not in d and "policy" not in d


def test_json_lines_to_a_stream_and_callback():
    t = NatTable([EGRESS], capacity=16, seed=1)
    fl = FlowLog(64)
    t.flow_log = fl
    buf = io.StringIO()
    seen = []
    logger = FlowLogger(fl, [JsonLinesSink(buf), CallbackSink(seen.append)], node="n1")
    traffic(t, 2)
    assert logger.poll() == 4
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [d["kind"] for d in lines] == ["start", "start", "end", "end"] or \
        sorted(d["kind"] for d in lines) == ["end", "end", "start", "start"]
    assert lines == seen
    assert logger.stats["written"] == 4 and logger.stats["dropped"] == 0


def test_stdout_is_the_default(capsys):
    fl = FlowLog(8)
    fl._append(1, src=APP1, dst=SERVER, sport=1, dport=2, proto=17)
    FlowLogger(fl).poll()
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["src"] == APP1


def test_rotating_file(tmp_path):
    path = tmp_path / "flows.jsonl"
    t = NatTable([EGRESS], capacity=256, seed=1)
    fl = FlowLog(1024)
    t.flow_log = fl
    logger = FlowLogger(fl, JsonLinesSink(str(path), max_bytes=2000, backup_count=3))
    traffic(t, 60)
    logger.poll()
    logger.stop()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["flows.jsonl", "flows.jsonl.1", "flows.jsonl.2", "flows.jsonl.3"]
    for name in files:
        text = (tmp_path / name).read_text()
        assert len(text) <= 2000 + 600
        for line in text.splitlines():
            json.loads(line)


class SlowSink:
    def __init__(self, delay):
        self.delay = delay
        self.n = 0

    def write(self, records):
        time.sleep(self.delay)
        self.n += len(records)


def test_slow_sink_never_stalls_the_datapath(caplog):
    """A sink that takes 0.3 s per batch: the datapath's appends never wait,
    the bounded queue drops whole batches, counts them and logs it."""
    t = NatTable([EGRESS], capacity=200_000, seed=1)
    fl = FlowLog(8192)
    t.flow_log = fl
    sink = SlowSink(0.3)
    logger = FlowLogger(fl, sink, queue_records=2000, interval=0.01, warn_every=0.0)
    with caplog.at_level(logging.WARNING, logger="egresscore.flowlog"):
        logger.start()
        worst = 0.0
        for k in range(30):
            rows = nat_tuples([(f"10.1.{k}.{i % 250 + 1}", 1024 + i, SERVER, 53, "udp")
                               for i in range(1000)])
            t0 = time.perf_counter()
            t.translate_batch(rows, 0, now=5.0)
            worst = max(worst, time.perf_counter() - t0)
            time.sleep(0.02)
        logger.stop(flush=False)
    s = logger.stats
    assert worst < 0.25                     # a batch of 1000 new flows never waited for the sink
    assert s["dropped"] > 0 and "too slow" in caplog.text
    ring = s["ring"]
    # every record the datapath made is accounted for: lost in C, dropped in
    # the queue, written, or still waiting
    assert ring["appended"]["start"] + ring["lost"] == 30_000
    assert s["drained"] + ring["waiting"] == ring["appended"]["start"]
    assert s["drained"] == s["dropped"] + s["written"] + s["queued"]
    assert sink.n == s["written"]


def test_broken_sink_is_counted_and_others_still_get_records():
    fl = FlowLog(8)
    fl._append(1, src=APP1, dst=SERVER)

    class Broken:
        def write(self, records):
            raise RuntimeError("disk full")

    seen = []
    logger = FlowLogger(fl, [Broken(), CallbackSink(seen.append)])
    logger.poll()
    assert logger.stats["sink_errors"] == 1 and len(seen) == 1


def test_threads_deliver_and_stop_flushes():
    t = NatTable([EGRESS], capacity=64, seed=1)
    fl = FlowLog(64)
    t.flow_log = fl
    seen = []
    with FlowLogger(fl, CallbackSink(seen.append), interval=0.01):
        traffic(t, 3)
        deadline = time.monotonic() + 5
        while len(seen) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(seen) == 6


def test_bad_arguments():
    with pytest.raises(TypeError):
        FlowLogger(object())
    with pytest.raises(TypeError):
        FlowLogger(FlowLog(4), [object()])
    with pytest.raises(ValueError):
        FlowLogger(FlowLog(4), queue_records=0)
    with pytest.raises(TypeError):
        CallbackSink(3)
