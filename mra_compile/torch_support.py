"""Which torch releases the package runs on, checked when it is imported.

The range is pyproject.toml's torch requirement (a test holds the two equal): the
releases whose whole test suite was run (README, "Supported"). Older ones lack what the op
is registered with (``torch.library.register_vmap``: torch 2.4 failed on import with
an AttributeError) or what compiled graphs use (Inductor's
``unsafe_marked_cacheable_functions``, ``compile_cache``: 2.5-2.7 failed in every
``torch.compile``d call), and 2.8 failed four tests (an invalid mask went unchecked in
a compiled Hugging Face call, FSDP2's gradients differed, no ``trace_autograd_ops``
for a compiled training step, FlexAttention without ``return_aux`` in the bench peer;
2.9 and 2.10 lack ``trace_autograd_ops`` too); a clear ImportError says so instead.
Releases past the range are untested: a warning, not an error (nightly builds report
the next version).
"""
from __future__ import annotations

import re
import warnings

# [oldest supported, first untested) as (major, minor); pyproject.toml: "torch>=2.11,<2.16"
TORCH_RANGE = ((2, 11), (2, 16))


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as ``2.13.0+cpu`` or ``2.16.0a0``."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        raise ValueError(f"torch version {version!r}: expected 'MAJOR.MINOR...'")
    return int(found.group(1)), int(found.group(2))


def check_torch(version: str) -> None:
    """ImportError for a torch older than ``TORCH_RANGE``, a warning past it."""
    (lo, hi), found = TORCH_RANGE, release(version)
    if found < lo:
        raise ImportError(
            f"mra_compile needs torch >= {lo[0]}.{lo[1]} (found torch {version}): "
            f"pip install 'torch>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}'")
    if found >= hi:
        warnings.warn(f"mra_compile is tested with torch {lo[0]}.{lo[1]} to "
                      f"{hi[0]}.{hi[1] - 1}; found torch {version}", stacklevel=3)
