"""mra-compile: MRA-2 attention compiled with Apache TVM, as ``torch.ops.mra.attention``.

Importing registers the op; TVM itself is loaded only when a kernel is first needed.
"""
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path


def _schedules_from_checkout() -> None:
    """``mra_compile.schedules`` is the top-level ``schedules/`` folder, mapped by the
    package install. Run from a source checkout that was not installed (e.g. a GPU machine
    given the checkout and a kernel library), map it here."""
    if _util.find_spec("mra_compile.schedules") is not None:
        return
    folder = _Path(__file__).resolve().parent.parent / "schedules"
    if not (folder / "__init__.py").is_file():
        return
    spec = _util.spec_from_file_location("mra_compile.schedules", folder / "__init__.py",
                                         submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None:
        return
    module = _util.module_from_spec(spec)
    _sys.modules["mra_compile.schedules"] = module
    spec.loader.exec_module(module)


_schedules_from_checkout()


def _check_torch() -> None:
    import torch

    from mra_compile.torch_support import check_torch

    check_torch(torch.__version__)


_check_torch()

from mra_compile import op as _op  # noqa: E402,F401  (registers torch.ops.mra.attention)
from mra_compile.api import block_selection, mra_attention  # noqa: E402
from mra_compile.build import cache_events  # noqa: E402
from mra_compile.host import cache_dir  # noqa: E402
from mra_compile.memory import clear_workspace  # noqa: E402

__all__ = ["mra_attention", "block_selection", "cache_dir", "cache_events", "clear_workspace"]
__version__ = "0.1.0"
