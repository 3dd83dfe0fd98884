"""Tools for developing the project: shared test and bench helpers, the import graph."""
