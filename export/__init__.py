"""PyTorch side of fmh-engine: the SlowFast model, checkpoints, ONNX and TensorRT export.

Imports torch; the runtime (``engine``) never imports this package.
"""
from .checkpoints import (Checkpoint, import_checkpoint, load_checkpoint,
                          save_checkpoint)
from .slowfast import (SlowFast, SlowFastConfig, build_slowfast, count_parameters,
                       flops_per_clip, slowfast_r18, slowfast_r50, slowfast_r101)

__all__ = ["SlowFast", "SlowFastConfig", "build_slowfast", "count_parameters", "flops_per_clip",
           "slowfast_r18", "slowfast_r50", "slowfast_r101", "Checkpoint", "load_checkpoint",
           "save_checkpoint", "import_checkpoint"]
