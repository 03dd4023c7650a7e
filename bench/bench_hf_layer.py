"""A Hugging Face encoder with ``attn_implementation="mra"`` against ``"sdpa"`` on the CPU.

One interleaved run per sequence length: a BERT encoder (random weights; hidden 768,
12 heads of 64, ``--layers`` layers, inference, fp32 unless ``--dtype``), the whole
model's forward with

- ``sdpa``: transformers' exact attention;
- ``mra``: MRA-2 through ``mra_compile.integrations.transformers`` (``mra_block_per_row``
  4, full mode), as it runs now: the layers' q, k, v read where they lie (the kernels'
  heads-last variant) and the launches replayed from the second call of a shape on;
- ``mra, copied``: the same with ``MRA_COMPILE_HEADS_LAST=0`` and
  ``MRA_COMPILE_LAUNCH_CACHE=0`` (q, k, v copied into the kernels' layout, the host work
  done every call: how these calls ran before 2026-12-05's seventh session).

``--batch B --padded``: B sequences, sequence i with N - i N / (2 B) real tokens (a
padding mask). ``--compiled``: also each model ``torch.compile``d (default options), sdpa
and mra, in the same rounds. Prints a markdown table; ``--out`` writes it.

    python bench/bench_hf_layer.py                                  # N = 512, 1024, 4096
    python bench/bench_hf_layer.py --sizes 1024 --batch 4 --padded --repeat 7
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from mra_compile import inputs, launch_cache  # noqa: E402
from mra_compile.tools import common  # noqa: E402
from mra_compile.tools.benchmarks import machine_line  # noqa: E402

SWITCHES = (inputs.HEADS_LAST_ENV, launch_cache.ENV)


def model_for(n: int, layers: int, dtype: torch.dtype):
    """A BERT encoder with random weights for sequences of up to ``n`` tokens."""
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                        num_hidden_layers=layers, max_position_embeddings=n,
                        attn_implementation="sdpa")
    torch.manual_seed(0)
    return BertModel(config).to(dtype).eval()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 4096])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--padded", action="store_true",
                   help="a padding mask: sequence i has N - i N / (2 B) real tokens")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--repeat", type=int, default=9, help="interleaved rounds (median)")
    p.add_argument("--compiled", action="store_true",
                   help="also time torch.compile'd copies of the model, sdpa and mra")
    p.add_argument("--out", type=Path, help="also write the table here")
    args = p.parse_args()
    if args.batch < 1 or args.layers < 1 or args.repeat < 1:
        p.error("--batch, --layers and --repeat must be >= 1")
    import mra_compile.integrations.transformers  # noqa: F401  (registers "mra")

    dtype = getattr(torch, args.dtype)
    given = {name: os.environ.get(name) for name in SWITCHES}
    lines = [machine_line(), "",
             f"BERT encoder, {args.layers} layers, hidden 768, 12 heads of 64, {args.dtype}, "
             f"B = {args.batch}{', padded' if args.padded else ''}, mra_block_per_row 4, full "
             f"mode; the whole forward, median of {args.repeat} interleaved rounds.", "",
             "| N | sdpa ms | mra ms | mra, copied ms | sdpa / mra | copied / mra |"
             + (" sdpa compiled ms | mra compiled ms | sdpa / mra, compiled |"
                if args.compiled else ""),
             "|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if args.compiled else "")]
    try:
        for n in args.sizes:
            model = model_for(n, args.layers, dtype)
            ids = torch.randint(1000, 20000, (args.batch, n))
            mask = torch.ones(args.batch, n, dtype=torch.long)
            if args.padded:
                for i in range(args.batch):
                    mask[i, n - i * n // (2 * args.batch):] = 0

            def run(implementation: str, switches: str = "11", model=model, ids=ids, mask=mask):
                def call():
                    os.environ.update(zip(SWITCHES, switches))
                    if implementation:  # (a compiled copy keeps its own)
                        model.set_attn_implementation(implementation)
                    return model(input_ids=ids, attention_mask=mask).last_hidden_state
                return call

            fns = {"sdpa": run("sdpa"), "mra": run("mra"), "copied": run("mra", "00")}
            if args.compiled:  # (a model of its own per implementation: one graph each)
                for implementation in ("sdpa", "mra"):
                    own = copy.deepcopy(model)
                    own.set_attn_implementation(implementation)
                    fns[f"{implementation}_c"] = run("", model=torch.compile(own))
            with torch.no_grad():
                for fn in fns.values():
                    fn()  # (compiles or loads the kernels; records the launches)
                ms = common.median_ms(fns, args.repeat, alternate=True)
            lines.append(f"| {n} | {ms['sdpa']:.2f} | {ms['mra']:.2f} | {ms['copied']:.2f} | "
                         f"{ms['sdpa'] / ms['mra']:.2f}x | {ms['copied'] / ms['mra']:.2f}x |"
                         + (f" {ms['sdpa_c']:.2f} | {ms['mra_c']:.2f} | "
                            f"{ms['sdpa_c'] / ms['mra_c']:.2f}x |" if args.compiled else ""))
            print(lines[-1], flush=True)
    finally:
        for name, value in given.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    command = " ".join(["python bench/bench_hf_layer.py", *sys.argv[1:]])
    lines += ["", f"Command: `{command}`"]
    print("\n".join(lines))
    if args.out is not None:
        common.write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
