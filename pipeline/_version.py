"""The package version (kept apart so that modules can record it without importing the API)."""

__version__ = "0.1.0"
