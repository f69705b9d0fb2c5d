"""The `egresscore` command line: one subcommand per job."""

import argparse
import sys


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="egresscore",
        description="A userspace egress gateway compatible with Cilium's CiliumEgressGatewayPolicy.",
    )
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv=None):
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
