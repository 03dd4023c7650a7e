"""mra-compile: MRA-2 attention compiled with Apache TVM, as ``torch.ops.mra.attention``.

Importing registers the op; TVM itself is loaded only when a kernel is first needed.
"""
from mra_compile import op as _op  # noqa: F401  (registers torch.ops.mra.attention)
from mra_compile.api import block_selection, mra_attention
from mra_compile.build import cache_dir, cache_events
from mra_compile.forward import clear_workspace

__all__ = ["mra_attention", "block_selection", "cache_dir", "cache_events", "clear_workspace"]
__version__ = "0.1.0"
