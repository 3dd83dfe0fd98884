"""Shared foundation: settings, protocol, Kafka and database access, local infrastructure."""

# The images of one release carry this tag (IMAGE_TAG defaults to it); kept equal to
# pyproject.toml by a unit test.
__version__ = "0.6.0"
