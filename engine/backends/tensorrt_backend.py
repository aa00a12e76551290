"""TensorRT 10 towers: deserialised engines run by tensor name with `execute_async_v3`.

One execution context per engine serves every thread (the batcher's threads and the index writer): a context holds
per-call state (input shape, tensor addresses), so each call binds and enqueues under the runner's lock, and all
work goes to the runner's own CUDA stream, never the legacy default stream a new worker thread would get.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, EngineError, InputError
from .base import l2_normalize, trim_padding


def import_tensorrt():
    """The tensorrt module (>= 10); an InputError explains what is missing otherwise."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise InputError("the TensorRT backend needs the tensorrt package (pip install 'tensorrt>=10') "
                         "and a CUDA GPU; use backend='onnxruntime' otherwise") from exc
    if int(trt.__version__.split(".")[0]) < 10:
        raise InputError(f"TensorRT {trt.__version__} found; this engine uses the TensorRT 10 API")
    return trt


class ContextRunner:
    """One TensorRT execution context, safe to call from many threads: each call sets the input shape, binds the
    input/output addresses and enqueues on `stream_handle` while holding one lock."""

    def __init__(self, context, input_name: str, output_name: str, output_dtype: torch.dtype, *,
                 device: torch.device, stream_handle: int, profile: tuple[tuple, tuple]) -> None:
        self.context = context
        self.input, self.output = input_name, output_name
        self.output_dtype = output_dtype
        self.device = device
        self.stream_handle = stream_handle
        self.min_shape, self.max_shape = profile
        self._lock = threading.Lock()

    def run(self, chunk: torch.Tensor) -> torch.Tensor:
        """Enqueue the engine on one contiguous input chunk (on `device`); returns its output (not yet synced)."""
        with self._lock:
            if not self.context.set_input_shape(self.input, tuple(chunk.shape)):
                raise InputError(f"input shape {list(chunk.shape)} is outside the engine's profile "
                                 f"{list(self.min_shape)}..{list(self.max_shape)}")
            out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.output_dtype,
                              device=self.device)
            self.context.set_tensor_address(self.input, chunk.data_ptr())
            self.context.set_tensor_address(self.output, out.data_ptr())
            if not self.context.execute_async_v3(self.stream_handle):
                raise EngineError(f"TensorRT execution failed for input shape {list(chunk.shape)}")
        return out


class EngineRunner:
    """One deserialised engine with one input and one output, run in chunks of its profile's maximum batch on the
    runner's own CUDA stream; safe to call from many threads."""

    def __init__(self, runtime, path: Path) -> None:
        trt = import_tensorrt()
        if not path.is_file():
            raise CheckpointError(f"TensorRT engine not found: {path}")
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise CheckpointError(f"TensorRT engine {path} could not be deserialised (corrupt, or built for another "
                                  f"GPU or TensorRT version); delete its directory to rebuild it")
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise CheckpointError(f"TensorRT engine {path} has inputs {inputs} and outputs {outputs}; "
                                  f"expected one of each")
        self.input, self.output = inputs[0], outputs[0]
        self.input_dtype = _torch_dtype(trt, engine.get_tensor_dtype(self.input))
        self.output_dtype = _torch_dtype(trt, engine.get_tensor_dtype(self.output))
        self.min_shape, _, self.max_shape = (tuple(s) for s in engine.get_tensor_profile_shape(self.input, 0))
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self.runner = ContextRunner(self.context, self.input, self.output, self.output_dtype, device=self.device,
                                    stream_handle=self.stream.cuda_stream, profile=(self.min_shape, self.max_shape))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.cuda.stream(self.stream):  # copies, buffers and the engine all on the runner's stream
            outs = [self.runner.run(chunk.to(self.device, dtype=self.input_dtype, non_blocking=True).contiguous())
                    for chunk in x.split(self.max_shape[0])]
            return torch.cat(outs).float().cpu()  # the copy waits on the stream


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.bool: torch.bool}
    if dtype not in table:
        raise CheckpointError(f"unsupported TensorRT tensor type {dtype}")
    return table[dtype]


class TensorRTEncoder:
    """The Encoder protocol over a vision and a text engine (built by engine.backends.tensorrt_engines)."""

    def __init__(self, vision_engine: str | Path, text_engine: str | Path, *, embed_dim: int, input_resolution: int,
                 pad_id: int = 0) -> None:
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise InputError("the TensorRT backend needs a CUDA GPU; none is available")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.vision = EngineRunner(runtime, Path(vision_engine))
        self.text = EngineRunner(runtime, Path(text_engine))
        self.embed_dim = embed_dim
        self.input_resolution = input_resolution
        self.pad_id = pad_id

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        r = self.input_resolution
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, r, r):
            raise InputError(f"pixels must have shape [B, 3, {r}, {r}], got {list(pixels.shape)}")
        if len(pixels) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        return l2_normalize(self.vision(pixels).numpy())

    def encode_texts(self, token_ids: torch.Tensor) -> np.ndarray:
        if token_ids.ndim != 2:
            raise InputError(f"token_ids must have shape [B, L], got {list(token_ids.shape)}")
        if len(token_ids) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        ids = trim_padding(token_ids.cpu().numpy().astype(np.int64, copy=False), self.pad_id, self.text.min_shape[1])
        if ids.shape[1] > self.text.max_shape[1]:
            raise InputError(f"texts of {ids.shape[1]} tokens exceed the engine's maximum of {self.text.max_shape[1]}")
        return l2_normalize(self.text(torch.from_numpy(ids)).numpy())
