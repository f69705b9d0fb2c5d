# nat: filled by its issue.
