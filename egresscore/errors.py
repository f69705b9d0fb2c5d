"""One error root: every error egresscore raises on purpose is an EgressError.

    try:
        agent = egresscore.Agent(...)
    except egresscore.EgressError as exc:
        ...

Each class keeps the builtin base it always had (ValueError for bad input,
RuntimeError for the host), so `except ValueError` callers keep working.  The
classes that carry context (PolicyError, ClusterError, InputError,
InputFileError, CLIError) live with the code that fills it in and derive from
EgressError; the core's exceptions (PacketDropped, NatRefused) are defined
on it in src/includes/errors.pxi.  Imports nothing from the package, so
every layer (and the core) may use it.
"""

__all__ = ["AgentError", "ControlError", "EgressError"]


class EgressError(Exception):
    """The root of egresscore's errors."""


class AgentError(EgressError, RuntimeError):
    """The agent cannot run on this host (missing namespace, interface, address)."""


class ControlError(EgressError):
    """The agent answered with an error, or could not be reached."""
