"""The EgressMap the compiler tests write into, read back as the compiler's Targets."""

from egresscore import EgressMap  # noqa: F401  (re-exported for the tests)
from egresscore.types import target_of


def map_state(em):
    """{(source, destination): Target} read back from an EgressMap."""
    out = {(str(e.source), str(e.destination)): target_of(e) for e in em.entries()}
    assert len(out) == len(em)
    return out
