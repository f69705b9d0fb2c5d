"""The network-namespace lab: a cluster on one machine (filled by its issue)."""
