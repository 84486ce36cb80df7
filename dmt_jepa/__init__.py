"""DMT-JEPA: discriminative masked targets for joint-embedding predictive architectures."""

__version__ = "0.1.0"
