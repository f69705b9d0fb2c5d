# nat declarations.
