"""A gateway daemon embedding egresscore: one node's agent with your own loop.

    sudo python examples/gateway_daemon.py --node node3 --cluster examples/cluster.yaml \
        --policies examples/egress-sample.yaml [--netns egc-lab-node3]

SIGHUP re-reads the policy files, SIGINT/SIGTERM stop and clean up; the
counters are printed every few seconds, and one line per connection that
ended (the flow log's callback sink).  --metrics-port serves Prometheus
metrics on 127.0.0.1.  (`egresscore agent` is the packaged form of the same
thing.)
"""
import argparse
import signal
import sys
import time

import egresscore


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--node", required=True)
    p.add_argument("--cluster", required=True)
    p.add_argument("--policies", required=True, nargs="+")
    p.add_argument("--netns")
    p.add_argument("--metrics-port", type=int)
    args = p.parse_args()

    def on_flow(rec):                         # runs on the flow log's writer thread
        if rec["kind"] == "end":
            print(f"{rec.get('pod', {}).get('name', rec['src'])} {rec['proto']} -> {rec['dst']}:{rec['dport']} "
                  f"as {rec['egress_ip']} ({rec.get('policy', 'masquerade')}): "
                  f"{rec['bytes_out']} B out, {rec['bytes_in']} B in, {rec['reason']}", flush=True)

    try:
        agent = egresscore.Agent(args.node, args.cluster, args.policies, netns=args.netns,
                                 flow_log=on_flow, metrics_port=args.metrics_port)
    except egresscore.EgressError as exc:     # bad input (InputError) or host (AgentError): nothing installed
        sys.exit(f"gateway daemon: {exc}")
    stop = []
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGHUP, lambda *_: agent.request_reload())
    print(f"gateway daemon for {args.node}: {len(agent.egress_map)} egress entries", flush=True)
    try:
        last = time.monotonic()
        while not stop:
            agent.step(timeout=0.02)          # one batch per ring, housekeeping once a second
            if time.monotonic() - last > 5:
                last = time.monotonic()
                c = agent.counters()
                print(f"rx {c['rx']} tx {c['tx']} local {c['tx_local']} nat {c['nat_entries']} drops {c['drops']}",
                      flush=True)
    finally:
        agent.close()                         # claims (FIB rules) and port range removed


if __name__ == "__main__":
    main()
