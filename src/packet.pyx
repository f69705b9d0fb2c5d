# packet: filled by its issue.
