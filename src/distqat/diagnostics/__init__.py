"""Tools to measure and check a swarm piece by piece, outside a full run."""
