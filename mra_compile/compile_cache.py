"""torch.compile's on-disk caches, keyed on this package's code.

Inductor keeps compiled graphs across processes (``TORCHINDUCTOR_CACHE_DIR``, by default
``/tmp/torchinductor_<user>``) under a key made from the Dynamo graph. A graph that calls
``torch.ops.mra.attention`` holds that call only; the code the op runs while a graph is
compiled (its decomposition into ``mra::attention_inference`` or
``mra::attention_fwd``/``attention_bwd``, their argument lists, the fake implementations'
shapes) is not part of the key. A graph compiled by one
version of mra_compile would then be loaded by the next one, and call the internal ops
with arguments they no longer take (or leave a change of the decomposition unapplied).

torch's hook for this is ``torch._inductor.config.unsafe_marked_cacheable_functions``: a
dict from name to key string that goes into every cache key. ``key_compiled_graphs`` puts
a digest of the package's sources there while a graph with one of the ops is traced
(before the key is computed); a changed package compiles its graphs again, once. Keys of
other graphs compiled in the same process change too (torch hashes the whole config):
they are compiled once more per version of this package, never loaded wrongly.
"""
from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path

import torch

# The name under which the digest goes into torch's config (torch's own example names
# the op this way).
ENTRY = "torch.ops.mra.attention"
_PACKAGE = Path(__file__).resolve().parent
# Kernel schedules and tuning records run at call time only; no compiled graph holds them.
_NOT_TRACED = ("schedules",)


@functools.cache
def digest() -> str:
    """SHA-256 of the package's Python sources (path and bytes of each, sorted), hex."""
    h = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        rel = path.relative_to(_PACKAGE)
        if rel.parts[0] in _NOT_TRACED:
            continue
        h.update(rel.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def key_compiled_graphs() -> None:
    """Put ``digest()`` into Inductor's cache keys (see the module's docstring). Called
    by the ops' fake implementations, which run whenever a graph holding them is traced;
    costs nothing where Inductor is not loaded (no cache key is computed there)."""
    if not torch.compiler.is_compiling() and "torch._inductor.config" not in sys.modules:
        return
    import torch._inductor.config as inductor_config

    marked = inductor_config.unsafe_marked_cacheable_functions
    value = digest()
    if marked.get(ENTRY) != value:
        # A new dict, not an update in place: the default object must stay the default.
        inductor_config.unsafe_marked_cacheable_functions = {**marked, ENTRY: value}
