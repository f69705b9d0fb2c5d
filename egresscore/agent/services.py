"""The services around an agent: flow log, metrics endpoint, control socket.

Each is off unless asked for; start_services wires the asked ones to the
agent (its datapath, NAT table, egress map, stats()) and records how to stop
them, in order, in agent._services (close() stops them in reverse).
"""
import functools
import os

from .._core import FlowLog
from ..control import ControlServer, default_socket_path, inspection_handlers
from ..flowlog import CallbackSink, Enricher, FlowLogger, JsonLinesSink


def flow_sinks(spec):
    """The sinks for a flow_log argument: True or "-" (stdout), a path, a
    callable, a sink object, or a list of those."""
    if spec is True or spec == "-":
        return [JsonLinesSink()]
    if isinstance(spec, (str, os.PathLike)):
        return [JsonLinesSink(os.fspath(spec))]
    if isinstance(spec, (list, tuple)):
        return [s for item in spec for s in flow_sinks(item)]
    if hasattr(spec, "write"):
        return [spec]
    if callable(spec):
        return [CallbackSink(spec)]
    raise TypeError(f"flow_log must be True, '-', a path, a callable or a sink, not {spec!r}")


def start_services(agent, *, flow_log=None, capacity=65536, drop_rate=100.0, metrics_port=None,
                   metrics_addr="127.0.0.1", control_socket=None):
    """Start the services asked for on `agent` (sets agent.flow_log,
    .flow_logger, .metrics, .control)."""
    if flow_log is not None and flow_log is not False:
        sinks = flow_sinks(flow_log)
        agent.flow_log = FlowLog(capacity, drop_rate=drop_rate)
        agent.datapath.set_flow_log(agent.flow_log)
        agent._enricher = Enricher(compiler=agent.compiler)
        agent.flow_logger = FlowLogger(agent.flow_log, sinks, node=agent.node, enrich=agent._enricher)
        agent.flow_logger.start()
        agent._services.append(functools.partial(_stop_flow_log, agent))
    if metrics_port is not None:
        from ..metrics import (
            MetricsServer,  # needs prometheus_client (the "metrics" extra)
        )

        agent.metrics = MetricsServer(agent.stats, metrics_port, metrics_addr, node=agent.node)
        agent._services.append(agent.metrics.stop)
    if control_socket is not None and control_socket is not False:
        path = (default_socket_path(agent.node, agent.netns) if control_socket is True
                else os.fspath(control_socket))
        handlers = inspection_handlers(egress_map=agent.egress_map, stats=agent.stats,
                                       policy_names=lambda: {i: n for n, i in agent.compiler.policy_ids.items()})
        # read the NAT table on the loop thread (its only writer), between batches
        handlers["gateway_health"] = agent.gateway_health
        handlers["nat_list"] = lambda: [e._asdict() for e in agent._submit(lambda: list(agent.nat.entries()))]
        agent.control = ControlServer(path, handlers).start()
        agent._services.append(agent.control.stop)


def _stop_flow_log(agent):
    # the connections still open end here (reason "eviction"): the log is complete;
    # kept for the next agent (keep_state), they go on and end in its log
    if not agent._keep_state:
        agent.nat.flush()
    agent.datapath.set_flow_log(None)
    agent.flow_logger.stop(flush=True)
