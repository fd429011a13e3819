"""The package version (a module of its own, so modules anywhere in the package can read it)."""

__version__ = "0.1.0"
