"""ganpipe: distributed, large-scale GAN training (import package `pipeline`)."""

__version__ = "0.1.0"
