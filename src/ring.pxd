# ring declarations.
