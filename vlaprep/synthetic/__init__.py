"""Generators of synthetic datasets in the real on-disk formats (RLDS/TFDS, CALVIN)."""
