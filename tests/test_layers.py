"""The package's structure: one-way imports, one kernel registry, one source of knob
defaults, one options object. What a new contributor relies on when adding a kernel, a
target or an option."""
import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from conftest import REPO

import mra_compile
from mra_compile import build, kernels, options, targets
from mra_compile.options import Options
from mra_compile.targets import cpu

TARGETS = (targets.CPU, targets.get("cuda-sm_90"))


def _modules() -> dict[str, Path]:
    """mra_compile's modules by dotted name (``schedules/`` is ``mra_compile.schedules``)."""
    mods = {}
    for path in (REPO / "mra_compile").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    for path in (REPO / "schedules").glob("*.py"):
        mods["mra_compile.schedules" + ("" if path.stem == "__init__" else "." + path.stem)] = path
    return mods


def _imports(name: str, path: Path, mods: dict) -> list[tuple[str, str | None]]:
    """(module, imported name or None) of every import in ``path``, at any depth."""
    found = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name in mods]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                if f"{base}.{a.name}" in mods:
                    found.append((f"{base}.{a.name}", None))
                elif base in mods:
                    found.append((base, a.name))
    return found


def test_imports_flow_one_way_and_no_private_names_cross_modules():
    mods = _modules()
    graph = {m: set() for m in mods}
    private = []
    for name, path in mods.items():
        for target, imported in _imports(name, path, mods):
            if target != name:
                graph[name].add(target)
            if imported and imported.startswith("_") and not imported.startswith("__"):
                private.append(f"{name} imports {target}.{imported}")
    assert not private
    # Depth-first search for a cycle (a module importing itself through others).
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_every_kernel_has_a_schedule_whose_knobs_are_its_defaults(target):
    """KNOBS is the only source of defaults: schedule functions take exactly those knobs,
    keyword-only and without defaults (plus ``full`` for kernels with modes, ``micro``
    for those that may call micro-kernels, ``MICRO``, and ``split_pv`` for those with a
    P-split variant, ``SPLIT_PV``)."""
    schedules = target.schedules
    assert set(schedules.KNOBS) == set(kernels.on_target(target))
    for name in kernels.on_target(target):
        kernel = kernels.get(name)
        params = inspect.signature(getattr(schedules, name)).parameters
        keyword = {p for p, v in params.items() if v.kind is v.KEYWORD_ONLY}
        micro = {"micro"} if name in getattr(schedules, "MICRO", ()) else set()
        # (only those that read bf16 q, k, v, or take bf16 operands in their micro variant)
        assert not micro or kernel.reads_qkv or kernel.takes_io, name
        split = {"split_pv"} if name in getattr(schedules, "SPLIT_PV", ()) else set()
        assert not split or kernel.splits_pv, name
        assert keyword == (set(schedules.KNOBS[name]) | ({"full"} if kernel.has_modes else set())
                           | micro | split)
        assert all(params[p].default is inspect.Parameter.empty for p in keyword), name
        assert set(kernel.shape_knobs) <= set(schedules.KNOBS[name]), name
    for name, space in getattr(schedules, "SPACES", {}).items():
        assert set(space) == set(schedules.KNOBS[name]), name


def test_tunable_kernels_come_from_the_registry_and_the_cpu_spaces():
    from mra_compile import records, tuning

    assert records.tunable_ops() == tuning.OPS == tuple(targets.CPU.schedules.SPACES)
    assert kernels.reading_qkv() == ("pool_and_logits", "hires_units", "hires_rows",
                                     "bwd_dq_units", "bwd_dkdv_units", "bwd_dkdv_ds_units",
                                     "bwd_dq_ds_units")


@pytest.mark.parametrize("name", sorted(kernels.KERNELS))
def test_registered_arguments_are_the_operator_parameters(name):
    """The registry's argument names are the TE builder's (``scheduled_func`` checks it on
    every build; here for both modes of moded kernels)."""
    kernel = kernels.get(name)
    target = targets.CPU if kernel.on(targets.CPU.family) else targets.get("cuda-sm_80")
    for full in (True, False) if kernel.has_modes else (None,):
        static = kernel.static(32, 64, full=full)
        knobs = target.default_knobs(name)
        func = build.scheduled_func(name, static, knobs, target)
        assert tuple(p.name for p in func.params) == kernel.arg_names(static)


def test_named_kernel_arguments_are_checked():
    kernel = kernels.get("lowres_out")
    static = kernel.static(32, 64)
    named = {a: i for i, a in enumerate(kernel.args)}
    assert kernel.order(static, named) == tuple(range(len(kernel.args)))
    with pytest.raises(TypeError, match=r"missing arguments \['heads'\], unexpected \['head'\]"):
        kernel.order(static, {**{a: 0 for a in kernel.args if a != "heads"}, "head": 0})
    rows = kernels.get("hires_rows")
    assert "o_lo" not in rows.arg_names(rows.static(32, 64, full=False))
    with pytest.raises(ValueError, match="full=True or False"):
        rows.static(32, 64)


def test_options_are_validated_once_and_drive_the_op_schema():
    opts = Options(10)
    assert opts.as_args() == (10, "full", 32, 0, 0, None, None, False) and opts.full
    names = [f.name for f in dataclasses.fields(Options)]
    schema = str(torch.ops.mra.attention.default._schema)
    for name in names:
        assert name in schema
    assert options.count() == len(names)
    with pytest.raises(ValueError, match="approx_mode"):
        Options(10, "dense")
    with pytest.raises(ValueError, match="block_size"):
        Options(10, block_size=48)
    with pytest.raises(TypeError, match="num_blocks"):
        Options(10.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.num_blocks = 3  # type: ignore[misc]


def test_one_budget_helper():
    assert options.budget(4, 100, 32) == 16
    assert options.budget(2, 1, 64) == 2  # at least one block row
    with pytest.raises(ValueError, match="block_per_row"):
        options.budget(0, 100, 32)


def test_targets_by_name_and_device():
    assert targets.of_device(torch.device("cpu")) is targets.CPU is targets.get(None)
    assert targets.get("cuda-sm_80").name == "cuda-sm_80"
    assert targets.get("cuda-sm_80") is targets.get("cuda-sm_80")
    with pytest.raises(ValueError, match="unknown kernel target"):
        targets.get("rocm")
    with pytest.raises(ValueError, match="runs on the CPU and on NVIDIA GPUs"):
        targets.of_device(torch.device("meta"))
    assert targets.CPU.io_dtype(torch.float16) == (
        torch.float16 if cpu.widened_in_place(torch.float16) else torch.float32)
    assert targets.get("cuda-sm_90").io_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="CUDA grid"):
        targets.get("cuda-sm_90").check_launch(n=70000)
    targets.CPU.check_launch(n=70000)


def test_public_names_stay():
    for name in ("mra_attention", "block_selection", "cache_dir", "cache_events",
                 "clear_workspace"):
        assert name in mra_compile.__all__ and callable(getattr(mra_compile, name))
