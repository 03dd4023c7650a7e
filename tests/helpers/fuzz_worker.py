"""Fuzzing the public entry points, run in a subprocess by tests/test_fuzz.py (a crash
there fails the test with the last case, printed to stderr before it ran).

    python tests/helpers/fuzz_worker.py VALID_EXAMPLES INVALID_EXAMPLES SEED
    FUZZ_MAX_N=2000 python tests/helpers/fuzz_worker.py 300 0 SEED   # longer sequences

Valid inputs (shapes, dtypes, masks in every accepted form, budgets, priors, block sizes,
strides, scale, grouped key/value heads, cross-attention with key and query padding)
must match the float64 reference given the op's own block selection (so ties cannot
differ), and so must the gradients of q, k, v where a case asks for them; invalid ones
must raise TypeError or ValueError, nothing else. Prints a JSON summary on stdout.
"""
import json
import os
import sys
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's helpers

from conftest import FLOAT32_OWN_FACTOR, float32_bound  # noqa: E402

import mra_compile  # noqa: E402
from mra_compile.reference import mra2_reference  # noqa: E402

RTOL = {torch.float32: 1e-5, torch.float64: 1e-9, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Gradients: each of dq, dk, dv against the largest entry of the three reference gradients
# (tests/test_backward.py, test_cross_attention.py).
GRAD_RTOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 2e-2,
             torch.bfloat16: 5e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
HEAD_DIMS = [1, 8, 16, 33, 40, 64]
MAX_N = int(os.environ.get("FUZZ_MAX_N", "200"))  # (longer: rows with overflow units)
counts = {"valid": 0, "cross": 0, "gradients": 0, "invalid": 0, "kinds": 0}


def announce(kind, **case):
    sys.stderr.write(json.dumps({kind: {k: str(v) for k, v in case.items()}}) + "\n")
    sys.stderr.flush()


def row_errors(out, ref):
    """Each (batch, head) row's largest |out - ref| relative to its largest |ref|, flat."""
    out, ref = out.double(), ref.double()
    err = (out - ref).abs().amax(dim=(-1, -2))
    return (err / ref.abs().amax(dim=(-1, -2)).clamp_min(1e-30)).flatten()


def worst_row_error(out, ref):
    if out.numel() == 0:
        return 0.0
    return row_errors(out, ref).max().item()


def layout(x, how):
    """``x`` with the same values in another memory layout."""
    if how == "transposed":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "strided":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


@st.composite
def valid_case(draw):
    B, H = draw(st.integers(0, 2)), draw(st.integers(1, 3))
    N, D = draw(st.integers(1, MAX_N)), draw(st.sampled_from(HEAD_DIMS))
    b = draw(st.sampled_from([16, 32]))
    # Cross-attention: keys of their own length and a query padding mask of their own
    # (with Nk == N too: a query mask makes the call cross-attention).
    cross = draw(st.booleans())
    Nk = draw(st.integers(1, MAX_N)) if cross else N
    n, nk = -(-N // b), -(-Nk // b)
    case = dict(B=B, H=H, N=N, Nk=Nk, D=D, dtype=draw(st.sampled_from(DTYPES)), block_size=b,
                mode=draw(st.sampled_from(["full", "sparse"])),
                mask=draw(st.sampled_from(["none", "right", "random"])),
                mask_dtype=draw(st.sampled_from([torch.float32, torch.bool, torch.int64])),
                layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
                first_n=draw(st.integers(0, 3)), diagonal_n=draw(st.integers(0, 4)),
                mask_form=draw(st.sampled_from(["2d", "bool4d", "additive4d"])),
                scale=draw(st.one_of(st.none(), st.floats(0.01, 4.0))),
                kv_heads=draw(st.sampled_from([d for d in (1, H) if H % d == 0])),
                query_mask=draw(st.sampled_from(["none", "right", "random"])) if cross
                else "none",
                gradients=draw(st.integers(0, 2)) == 0,  # (a third of the cases)
                seed=draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):
        case["num_blocks"] = draw(st.integers(1, n * nk + 3))
    else:
        case["block_per_row"] = draw(st.integers(1, max(n, nk) + 2))
    return case


def padding(kind, B, N, g, dtype):
    """A [B, N] padding mask of ``kind`` ("right": a random length each; "random": ~30%
    padding, one common real token), in ``dtype``; None for "none" or no batch."""
    if kind == "none" or not B:
        return None
    if kind == "right":
        lengths = torch.randint(1, N + 1, (B,), generator=g)
        mask = (torch.arange(N)[None, :] < lengths[:, None]).float()
    else:
        mask = (torch.rand(B, N, generator=g) < 0.7).float()
        mask[:, torch.randint(0, N, (1,), generator=g)] = 1
    return mask.to(dtype)


def check_float32(ours, plain_error, what):
    """Where float32 itself cannot reach its tolerance: ``ours`` (per-row errors) within
    ``float32_bound`` of the error of the spec evaluated by plain torch in float32
    (``plain_error()``, the same selection)."""
    floor = plain_error()
    over = (ours > float32_bound(floor)).nonzero().flatten()
    assert not len(over), (
        f"{what}: relative error {ours[over[0]]:.3g} > {FLOAT32_OWN_FACTOR}x plain "
        f"float32's {floor[over[0]]:.3g} (row {over[0].item()})")


def grad_errors(grads, ref_grads):
    """dq, dk, dv's largest errors, each relative to the largest entry of the three
    reference gradients (a gradient zero in exact arithmetic has no scale of its own),
    as a tensor of three."""
    size = max(r.abs().max().item() for r in ref_grads) or 1.0
    return torch.tensor([(a.double() - r).abs().max().item() / size
                         for a, r in zip(grads, ref_grads)])


def with_grads(fn, xs, grad_out):
    """(out, [dq, dk, dv]) of ``fn`` on leaves copied from ``xs``."""
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [x.grad for x in leaves]


def fuzz_valid(case):
    announce("valid", **case)
    g = torch.Generator().manual_seed(case["seed"])
    B, H, N, Nk, D, dt = case["B"], case["H"], case["N"], case["Nk"], case["D"], case["dtype"]
    Hkv = case["kv_heads"]
    q, k, v = (layout(torch.randn(B, heads, length, D, generator=g).to(dt), case["layout"])
               for heads, length in ((H, N), (Hkv, Nk), (Hkv, Nk)))
    mask = padding(case["mask"], B, Nk, g, case["mask_dtype"])
    query_mask = padding(case["query_mask"], B, N, g, case["mask_dtype"])
    real = None if mask is None else mask != 0  # [B, Nk] bool, what every form says
    if real is not None and case["mask_form"] == "bool4d":
        mask = real[:, None, None, :]
    elif real is not None and case["mask_form"] == "additive4d":
        mask = torch.zeros(B, 1, 1, Nk, dtype=dt).masked_fill(~real[:, None, None, :],
                                                             float("-inf"))
    # The queries' padding: the query mask, or for self-attention the key mask.
    self_attention = Nk == N and query_mask is None
    real_queries = (real if self_attention else
                    None if query_mask is None else query_mask != 0)
    budget = ({"num_blocks": case["num_blocks"]} if "num_blocks" in case
              else {"block_per_row": case["block_per_row"]})
    kw = dict(approx_mode=case["mode"], block_size=case["block_size"],
              initial_prior_first_n_blocks=case["first_n"],
              initial_prior_diagonal_n_blocks=case["diagonal_n"], scale=case["scale"],
              enable_gqa=Hkv != H, query_mask=query_mask)
    gradients = case["gradients"] and B > 0
    grad_out = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    if gradients:
        out, grads = with_grads(lambda *x: mra_compile.mra_attention(*x, mask, **budget, **kw),
                                (q, k, v), grad_out)
        assert [x.shape for x in grads] == [q.shape, k.shape, v.shape]
        assert all(x.dtype == dt for x in grads)
    else:
        out = mra_compile.mra_attention(q, k, v, mask, **budget, **kw)
    assert out.shape == q.shape and out.dtype == dt
    counts["valid"] += 1
    counts["cross"] += not self_attention
    if B == 0:
        return
    sel = mra_compile.block_selection(q, k, v, mask, **budget, **kw)
    def reference(*x, real_dtype=torch.float64):
        def real_of(m):  # (a padding mask as 0/1 of the reference's dtype)
            return None if m is None else (m != 0).to(real_dtype)

        return mra2_reference(*x, None if real is None else real.to(real_dtype), **budget,
                              **dict(kw, selection=sel, query_mask=real_of(query_mask)))

    if gradients:
        ref, ref_grads = with_grads(reference, [x.double() for x in (q, k, v)], grad_out)
    else:
        ref = reference(q.double(), k.double(), v.double())
    err = worst_row_error(out, ref)
    if err > RTOL[dt] and dt == torch.float32:
        check_float32(row_errors(out, ref),
                      lambda: row_errors(reference(q, k, v, real_dtype=torch.float32), ref),
                      "output")
    else:
        assert err <= RTOL[dt], f"relative error {err:.3g} > {RTOL[dt]:g}"
    if real_queries is not None:
        assert torch.all(out[(~real_queries)[:, None, :].expand(B, H, N)] == 0)
    if not gradients:
        return
    counts["gradients"] += 1
    errors = grad_errors(grads, ref_grads)
    if errors.max() > GRAD_RTOL[dt] and dt == torch.float32:
        def plain():
            _, plain_grads = with_grads(lambda *x: reference(*x, real_dtype=torch.float32),
                                        (q, k, v), grad_out)
            return grad_errors(plain_grads, ref_grads)
        # (float32_bound's floor is the forward's 1e-5: the gradients' is 1e-4)
        check_float32(errors / (GRAD_RTOL[dt] / RTOL[dt]),
                      lambda: plain() / (GRAD_RTOL[dt] / RTOL[dt]), "gradients")
    else:
        assert errors.max() <= GRAD_RTOL[dt], (
            f"gradient errors {errors.tolist()} > {GRAD_RTOL[dt]:g}")
    if real_queries is not None:  # padded queries: no gradient
        assert torch.all(grads[0][(~real_queries)[:, None, :].expand(B, H, N)] == 0)


def good():
    return torch.randn(1, 2, 40, 16)


INVALID = {
    "q not a tensor": lambda: mra_compile.mra_attention([1.0], good(), good()),
    "int q": lambda: mra_compile.mra_attention(*(torch.ones(1, 2, 40, 16, dtype=torch.int32),) * 3),
    "3-d q": lambda: mra_compile.mra_attention(*(torch.randn(2, 40, 16),) * 3),
    "k shape": lambda: mra_compile.mra_attention(good(), torch.randn(1, 2, 41, 16), good()),
    "v dtype": lambda: mra_compile.mra_attention(good(), good(), good().double()),
    "N=0": lambda: mra_compile.mra_attention(*(torch.randn(1, 2, 0, 16),) * 3),
    "mask shape": lambda: mra_compile.mra_attention(good(), good(), good(), torch.ones(1, 39)),
    "mask 2": lambda: mra_compile.mra_attention(good(), good(), good(), 2 * torch.ones(1, 40)),
    "mask complex": lambda: mra_compile.mra_attention(
        good(), good(), good(), torch.ones(1, 40, dtype=torch.complex64)),
    "num_blocks 0": lambda: mra_compile.mra_attention(good(), good(), good(), num_blocks=0),
    "num_blocks float": lambda: mra_compile.mra_attention(good(), good(), good(), num_blocks=2.0),
    "num_blocks 2**64": lambda: mra_compile.mra_attention(good(), good(), good(),
                                                          num_blocks=2**64),
    "both budgets": lambda: mra_compile.mra_attention(good(), good(), good(), num_blocks=2,
                                                      block_per_row=2),
    "mode": lambda: mra_compile.mra_attention(good(), good(), good(), approx_mode="dense"),
    "block_size 24": lambda: mra_compile.mra_attention(good(), good(), good(), block_size=24),
    "block_size 512": lambda: mra_compile.mra_attention(good(), good(), good(), block_size=512),
    "prior -1": lambda: mra_compile.mra_attention(good(), good(), good(),
                                                  initial_prior_first_n_blocks=-1),
    "prior 2**63": lambda: mra_compile.mra_attention(good(), good(), good(),
                                                     initial_prior_diagonal_n_blocks=2**63),
    "op num_blocks -3": lambda: torch.ops.mra.attention(good(), good(), good(), None, -3),
    "op mode": lambda: torch.ops.mra.attention(good(), good(), good(), None, 3, "dense"),
    "selection num_blocks": lambda: mra_compile.block_selection(good(), good(), good(),
                                                                num_blocks=0),
    "scale 0": lambda: mra_compile.mra_attention(good(), good(), good(), scale=0.0),
    "scale nan": lambda: mra_compile.mra_attention(good(), good(), good(), scale=float("nan")),
    "scale str": lambda: mra_compile.mra_attention(good(), good(), good(), scale="0.1"),
    "kv heads without gqa": lambda: mra_compile.mra_attention(
        torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)),
    "kv heads not dividing": lambda: mra_compile.mra_attention(
        torch.randn(1, 3, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16),
        enable_gqa=True),
    "per-query mask": lambda: mra_compile.mra_attention(
        good(), good(), good(), torch.ones(1, 1, 40, 40, dtype=torch.bool)),
    "per-head mask": lambda: mra_compile.mra_attention(
        good(), good(), good(), torch.ones(1, 2, 1, 40, dtype=torch.bool)),
    "block_per_row 0": lambda: mra_compile.mra_attention(good(), good(), good(),
                                                         block_per_row=0),
    "query_mask shape": lambda: mra_compile.mra_attention(good(), good(), good(),
                                                          query_mask=torch.ones(1, 39)),
    "query_mask 2": lambda: mra_compile.mra_attention(good(), good(), good(),
                                                      query_mask=2 * torch.ones(1, 40)),
    "query_mask -inf": lambda: mra_compile.mra_attention(
        good(), good(), good(), query_mask=torch.zeros(1, 40).index_fill(1, torch.tensor([3]),
                                                                         float("-inf"))),
    "cross mask length": lambda: mra_compile.mra_attention(
        good(), torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16), torch.ones(1, 40)),
    "k, v lengths": lambda: mra_compile.mra_attention(good(), torch.randn(1, 2, 41, 16), good()),
}


def fuzz_invalid(name):
    announce("invalid", name=name)
    try:
        INVALID[name]()
    except (TypeError, ValueError):
        counts["invalid"] += 1
        return
    raise AssertionError(f"{name}: no TypeError/ValueError")


def run(test, strategy, examples: int, seed_value: int) -> None:
    configured = settings(max_examples=examples, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
    seed(seed_value)(configured(given(strategy)(test)))()


if __name__ == "__main__":
    valid, invalid, seed_value = map(int, sys.argv[1:4])
    for test, strategy, examples in ((fuzz_valid, valid_case(), valid),
                                     (fuzz_invalid, st.sampled_from(sorted(INVALID)), invalid)):
        if examples:
            run(test, strategy, examples, seed_value)
    counts["kinds"] = len(INVALID)
    print(json.dumps(counts))
