"""Side-by-side benchmarks: every egresscore figure next to its peer, one run.

Each concern has a benchmarks/compare_<concern>.py exposing
`run(quick: bool) -> str` (a Markdown table with rates and ratios); this
script prints the machine, then every table.  `--quick` uses small inputs.
"""
import argparse
import importlib
import os
import platform
import sys

# README order
SECTIONS = ["lpm", "nat", "packet", "datapath", "ring", "compiler", "agent", "agent_peers", "flowlog", "lab"]


def machine_summary():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"machine: {platform.machine()} {cpu}, {os.cpu_count()} cores, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, for a smoke run")
    parser.add_argument("sections", nargs="*", help=f"subset of {SECTIONS}")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(machine_summary())
    for name in args.sections or SECTIONS:
        module = importlib.import_module(f"compare_{name}")
        print()
        print(module.run(quick=args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
