"""Tower backends behind one small interface: torch (reference), onnxruntime, tensorrt."""
from .base import Encoder, l2_normalize
from .torch_backend import TorchEncoder

__all__ = ["Encoder", "TorchEncoder", "l2_normalize"]
