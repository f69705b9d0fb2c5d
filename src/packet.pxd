# packet declarations.
