# ring: filled by its issue.
