"""DistQat: distributed quantization-aware training across unreliable, heterogeneous machines."""

__version__ = "0.1.0"
