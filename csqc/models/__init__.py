"""Model architectures csqc ships: the digits demo models and float reference architectures."""
from .digits import digits_cnn, digits_mlp
from .transformer import transformer_encoder

__all__ = ["digits_mlp", "digits_cnn", "transformer_encoder"]
