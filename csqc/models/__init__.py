"""Model architectures csqc ships: the digits demo models and float reference architectures."""
from .digits import digits_cnn, digits_mlp

__all__ = ["digits_mlp", "digits_cnn"]
