"""The distribution's version, in a module of its own so that every layer can read it
without importing the package root (which reaches the SDK's importers)."""

__version__ = "0.1.0"
