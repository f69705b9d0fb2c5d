"""The one loading path for what an agent runs on: a cluster file and policy
files, accepted whole or rejected whole.

Agent start, Agent.set_policies, Agent.reload, SIGHUP and the CLI (`egress
list`, `validate`, `agent`) all load through load_inputs, so they accept and
refuse exactly the same inputs.  The rules:

- Every file is read with egresscore.files.read_input_file: regular files only
  (a symlink to one is fine), at most MAX_INPUT_BYTES (4 MiB) each; a FIFO or a
  device is an error naming it, never a read that blocks.
- A file named explicitly that is missing, unreadable, not a regular file,
  over the size limit, empty (no document, only comments) or holding any bad
  document rejects the whole load.
- A folder: every policy file in it (*.yaml, *.yml, *.json, recursively, dot
  files skipped) must be good.  A file removed from a folder removes its
  policies: that is how a user deletes policies.  Edit a file by writing a
  new one and renaming it over the old (atomic); a reload that sees a
  half-written (empty or truncated) file is rejected.  An empty folder means
  no policies.
- Duplicate policy names anywhere in the set are rejected, as are duplicate
  nodes, node IPs, namespaces, pods and pod IPs in the cluster file.
- Warnings (e.g. an excludedCIDR outside every destinationCIDR) are returned,
  they do not reject.

A rejected load raises InputError listing every problem found (each a
PolicyError or ClusterError with file, document, line and field); the caller
applies nothing, so the policies and cluster in force keep working.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from .cluster import Cluster, ClusterError, load_cluster
from .errors import EgressError
from .files import MAX_INPUT_BYTES
from .policy import EgressPolicy, PolicyError, load_policies

__all__ = ["InputError", "Inputs", "load_inputs", "check_policies", "MAX_INPUT_BYTES"]


class InputError(EgressError, ValueError):
    """Inputs rejected whole: `errors` holds every problem (PolicyError,
    ClusterError); str() is one line, the first problem and how many more."""

    def __init__(self, errors):
        self.errors = list(errors)
        super().__init__(str(self))

    def __str__(self):
        more = len(self.errors) - 1
        first = str(self.errors[0]) if self.errors else "rejected"
        return first if more <= 0 else f"{first} (and {more} more problem{'s' if more > 1 else ''})"


class Inputs(NamedTuple):
    """A load that passed: the cluster (None if no file was given), the
    policies (None if no paths were given) and the warnings."""

    cluster: Cluster | None
    policies: list | None
    warnings: list


def check_policies(policies) -> list:
    """EgressPolicy objects as a list; InputError for another type or a duplicate name."""
    errors, seen = [], {}
    policies = list(policies)
    for i, p in enumerate(policies):
        if not isinstance(p, EgressPolicy):
            errors.append(PolicyError(f"policies[{i}] is {type(p).__name__}, not an EgressPolicy or a path"))
        elif p.name in seen:
            errors.append(PolicyError(f"duplicate policy name (also policies[{seen[p.name]}])", policy=p.name,
                                      path="metadata.name"))
        else:
            seen[p.name] = i
    if errors:
        raise InputError(errors)
    return policies


def load_inputs(cluster=None, policies=None) -> Inputs:
    """Load a cluster file and policy files/folders, all or nothing (see the
    module docstring).  cluster: a path or None; policies: a path, a list of
    paths, or None (not loaded)."""
    errors, warnings = [], []
    loaded_cluster = loaded_policies = None
    if cluster is not None:
        try:
            loaded_cluster = load_cluster(cluster)
        except ClusterError as exc:
            errors.append(exc)
    if policies is not None:
        if isinstance(policies, (str, os.PathLike)):
            policies = [policies]
        result = load_policies(*policies)
        errors.extend(result.errors)
        warnings.extend(result.warnings)
        loaded_policies = result.policies
    if errors:
        raise InputError(errors)
    return Inputs(loaded_cluster, loaded_policies, warnings)
