"""A TorchFunctionMode that records the calls of torch.ops.mra.attention (shared by tests)."""
import torch
from torch.overrides import TorchFunctionMode


class RecordMraCalls(TorchFunctionMode):
    """Records the arguments of every torch.ops.mra.attention call (as the caller made it)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.mra.attention or func is torch.ops.mra.attention.default:
            self.calls.append((args, kwargs))
        return func(*args, **kwargs)
