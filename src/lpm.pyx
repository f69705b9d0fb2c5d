# lpm: filled by its issue.
