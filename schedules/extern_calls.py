"""Tensor intrinsics whose implementation is one call of a C function (the CPU
micro-kernels of ``cpu_bf16.c`` and the output stores of ``cpu_stores.c``): built from
the intrinsic's description, so that the two cannot disagree about the buffers."""
from __future__ import annotations


def called(desc, call):
    """The implementation of an intrinsic described by ``desc``: its root block with the
    loops replaced by one extern call, ``call(reads, writes)`` giving the callee's name
    and arguments from the root block's buffers (in the order it reads and writes them)."""
    from tvm import tirx
    from tvm.s_tir import stmt as s_stmt

    realize = desc.body
    root = realize.block
    name, *args = call(tuple(r.source for r in root.reads), tuple(w.source for w in root.writes))
    body = tirx.Evaluate(tirx.call_extern("int32", name, *args))
    block = s_stmt.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, body,
                          root.init, root.alloc_buffers, root.match_buffers, root.annotations)
    return desc.with_body(s_stmt.SBlockRealize(realize.iter_values, realize.predicate, block))


def pointer(buf):
    """The address of ``buf``'s first element, as the callee's pointer argument: the
    address of a load, not ``buf.access_ptr``. TVM's StorageRewrite gives a kernel's
    dead buffer to a later one of another dtype where it fits (a unit's bf16 queries'
    [b, D] to its float32 logits, in ``hires_units`` with one block a unit or at head
    dims from 128 on), and then rejects an access pointer whose element type is not the
    buffer's ("tvm_access_ptr element type must match the source buffer"), where a load
    of the reused buffer is retyped."""
    from tvm import tirx

    return tirx.address_of(tirx.BufferLoad(buf, [0] * len(buf.shape)))
