"""diffalign: align text-to-image diffusion models with rewards."""

__version__ = "0.1.0"
