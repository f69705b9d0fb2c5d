"""The EgressMap the compiler tests write into, read back as the compiler writes its entries (strings)."""

from egresscore import EgressMap  # noqa: F401  (re-exported for the tests)


def map_state(em):
    """{(source, destination): EgressEntry of strings (EgressEntry.listed)} read back from an EgressMap."""
    out = {(str(e.source), str(e.destination)): e.listed() for e in em.entries()}
    assert len(out) == len(em)
    return out
