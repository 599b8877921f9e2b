"""The version, read by the package, the server, the model card and the build (pyproject's dynamic version)."""

__version__ = "0.1.0"
