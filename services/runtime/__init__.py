"""Shared runtime of the image tasks: the task contract, image helpers and the runner."""
