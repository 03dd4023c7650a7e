"""torch.compile's on-disk caches are keyed on this package's code (mra_compile.compile_cache):
a graph compiled by another version of mra_compile is compiled again, never loaded."""
import torch
import torch._functorch.config
import torch._inductor.config as inductor_config
from conftest import make_qkv
from torch._dynamo.utils import counters

import mra_compile  # noqa: F401  (registers the ops)
from mra_compile import compile_cache


def _loss(q, k, v):
    return torch.ops.mra.attention(q, k, v, None).square().sum()


def _compiled_step(qkv):
    """One compiled forward and backward in a fresh Dynamo: (AOTAutograd cache hits,
    misses, the gradients)."""
    torch._dynamo.reset()
    counters.clear()
    leaves = [t.clone().requires_grad_() for t in qkv]
    torch.compile(_loss, fullgraph=True)(*leaves).backward()
    aot = counters["aot_autograd"]
    return aot["autograd_cache_hit"], aot["autograd_cache_miss"], [t.grad for t in leaves]


def test_compiled_graphs_are_keyed_on_the_package(tmp_path, monkeypatch, fresh_dynamo):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    # (torch's config.patch, not monkeypatch: undoing monkeypatch.setattr on this dict
    # setting deletes the setting)
    with inductor_config.patch(fx_graph_cache=True, unsafe_marked_cacheable_functions=dict(
            inductor_config.unsafe_marked_cacheable_functions)), \
            torch._functorch.config.patch(enable_autograd_cache=True):
        _keyed_on_the_package(monkeypatch)
    assert isinstance(inductor_config.unsafe_marked_cacheable_functions, dict)  # (still there)


def _keyed_on_the_package(monkeypatch):
    qkv = make_qkv(0, 1, 2, 64, 16)

    hits, misses, first = _compiled_step(qkv)
    assert (hits, misses) == (0, 1)
    assert inductor_config.unsafe_marked_cacheable_functions[compile_cache.ENTRY] == \
        compile_cache.digest()
    # The same package: loaded from the cache (so that the next step can fail).
    hits, misses, again = _compiled_step(qkv)
    assert (hits, misses) == (1, 0)
    # Another version of the package (its sources differ): compiled again.
    monkeypatch.setattr(compile_cache, "digest", lambda: "another version")
    hits, misses, other = _compiled_step(qkv)
    assert (hits, misses) == (0, 1)
    assert inductor_config.unsafe_marked_cacheable_functions[compile_cache.ENTRY] == \
        "another version"
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_the_digest_covers_the_sources_graphs_run(tmp_path, monkeypatch):
    # Every module but the kernel schedules: a copy of the package with one byte of
    # op.py changed has another digest; one with a schedule changed has the same.
    import shutil

    src = compile_cache._PACKAGE
    copy = tmp_path / "mra_compile"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__", "schedules"))
    (copy / "schedules").mkdir()
    (copy / "schedules" / "knobs.py").write_text("X = 1\n")

    def digest_of(package):
        monkeypatch.setattr(compile_cache, "_PACKAGE", package)
        compile_cache.digest.cache_clear()
        try:
            return compile_cache.digest()
        finally:
            compile_cache.digest.cache_clear()

    base = digest_of(copy)
    assert base == digest_of(src)  # the same sources; other schedules
    (copy / "schedules" / "knobs.py").write_text("X = 2\n")
    assert digest_of(copy) == base
    (copy / "op.py").write_bytes((copy / "op.py").read_bytes() + b"\n")
    assert digest_of(copy) != base
