"""tunerd: the Level 2 tuner of a Level 1 auto-retry wrapper's parameters."""

__version__ = "0.1.0"
