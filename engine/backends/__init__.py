"""Tower backends behind one small interface: torch (reference), onnxruntime, tensorrt."""
from .base import Encoder, l2_normalize
from .onnx_backend import OnnxEncoder, OrtSettings  # onnxruntime itself is imported on first use
from .tensorrt_backend import TensorRTEncoder  # tensorrt itself is imported on first use
from .torch_backend import TorchEncoder

__all__ = ["Encoder", "OnnxEncoder", "OrtSettings", "TensorRTEncoder", "TorchEncoder", "l2_normalize"]
