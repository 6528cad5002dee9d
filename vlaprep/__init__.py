"""vlaprep: data preparation for Vision-Language-Action training."""

__version__ = "0.1.0"
