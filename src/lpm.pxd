# lpm declarations.
