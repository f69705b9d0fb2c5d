"""One node's agent, split by job:

- lifecycle: the Agent class: start, the loop, control changes, reloads, stop;
- host: host set-up on a thread inside the node's namespace (claims,
  sysctls, neighbours, the state file kept across crashes);
- rings: the ring plan (which ring each interface gets, and its sizes);
- sched: the datapath thread's scheduling (SCHED_FIFO, a CPU);
- services: flow log, metrics endpoint and control socket wiring;
- tunnel: the kernel vxlan device that carries tunnel-bound super-packets.

    from egresscore.agent import Agent, AgentError
"""
from .host import AgentError
from .lifecycle import (
    DEFAULT_KERNEL_PORTS,
    DEFAULT_NAT_CAPACITY,
    DEFAULT_NAT_PORTS,
    DEFAULT_PIN_CAPACITY,
    Agent,
)
from .rings import RING_MODES
from .sched import DEFAULT_RT_PRIORITY

__all__ = ["DEFAULT_KERNEL_PORTS", "DEFAULT_NAT_CAPACITY", "DEFAULT_NAT_PORTS", "DEFAULT_PIN_CAPACITY",
           "DEFAULT_RT_PRIORITY", "RING_MODES",
           "Agent", "AgentError"]
