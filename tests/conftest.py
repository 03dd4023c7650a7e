"""What the test files share: fixtures (found by pytest) and plain helpers.

The plain helpers are imported as ``from conftest import name``: pytest's default
("prepend") import mode puts tests/ on ``sys.path`` (tests/ is not a package), the same
way ``from helpers.recording import ...`` works.
"""
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# The op (float32 arithmetic) against the float64 oracle: largest relative error.
RTOL_FP32 = 1e-5
# Where float32 itself cannot reach RTOL_FP32 (logits beyond about +-60: README,
# "Limitations"), the op may be off by this factor times the error of the spec evaluated
# by plain torch in float32 (``mra2_reference`` on the float32 inputs, the same selection).
FLOAT32_OWN_FACTOR = 1.5


def float32_bound(own):
    """The error allowed the float32 op where plain float32 torch's own error is ``own`` (a
    float, or a tensor of per-row errors): RTOL_FP32, or FLOAT32_OWN_FACTOR times ``own``
    where that is larger."""
    if isinstance(own, torch.Tensor):
        return torch.clamp(FLOAT32_OWN_FACTOR * own, min=RTOL_FP32)
    return max(RTOL_FP32, FLOAT32_OWN_FACTOR * own)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Tuning records: a private user db (returned, not yet created) and no shipped
    records, for any target."""
    from mra_compile import records

    db = tmp_path / "user" / "tuned.json"
    monkeypatch.setenv(records.ENV_DB, str(db))
    monkeypatch.delenv(records.ENV_ENABLE, raising=False)
    monkeypatch.setattr(records, "shipped_db_path",
                        lambda target=None: tmp_path / "shipped" / "none.json")
    records.reload()
    yield db
    records.reload()


@pytest.fixture
def avx512_defaults(isolated, monkeypatch):
    """The default knobs of an AVX-512 CPU (vec=16, qk_rows=4, ...) whatever this one has,
    for tests whose fake timers or expectations are written against them: the records
    ``isolated`` (no shipped records, which would be this CPU's vector width's: an AVX2
    host's give vec=8; a private user db, so that a developer's own tuning runs change
    nothing here). Returns ``isolated``'s user db. (``isolated`` reloads the records
    before and after: no knobs cached under the pretended width outlive it.)"""
    from mra_compile import host

    monkeypatch.setattr(host, "default_vector_width", lambda: 16)
    return isolated


@pytest.fixture
def fresh_dynamo():
    """torch._dynamo reset before and after the test (compiled graphs, caches, counters)."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---------------------------------------------------------------------------- inputs


def make_qkv(seed, B, H, N, D, scale=1.0, dtype=torch.float32, sample_dtype=torch.float32):
    """Random q, k, v [B, H, N, D], reproducible from seed: drawn in ``sample_dtype``,
    scaled, then cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return tuple((scale * torch.randn(B, H, N, D, generator=g, dtype=sample_dtype)).to(dtype)
                 for _ in range(3))


def padded_mask(N, lengths, dtype=torch.float32):
    """A [len(lengths), N] 0/1 mask: row b has its first ``lengths[b]`` tokens real."""
    return (torch.arange(N)[None, :] < torch.as_tensor(lengths)[:, None]).to(dtype)


def padding_mask(lengths, N, kind):
    """A key padding mask for sequences of ``lengths`` tokens: [B, N] float 0/1 or bool
    (``kind`` "float", "bool"; "int64", "uint8", "float64": those dtypes; "strided": float
    0/1, every other column of a wider tensor), SDPA's [B, 1, 1, N] bool ("bool4d"), or the
    additive [B, 1, 1, N] float form ("additive": 0 = real, -inf = padding)."""
    real = torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]
    if kind == "bool":
        return real
    if kind == "bool4d":
        return real[:, None, None, :]
    if kind == "additive":
        return torch.zeros(len(lengths), 1, 1, N).masked_fill(~real[:, None, None, :],
                                                              float("-inf"))
    if kind in ("int64", "uint8", "float64"):
        return real.to(getattr(torch, kind))
    if kind == "strided":
        wide = torch.full((len(lengths), 2 * N), 7.0)
        wide[:, ::2] = real.float()
        return wide[:, ::2]
    return real.float()


def n_blocks(N, b=32):
    """Blocks of b tokens covering N tokens."""
    return -(-N // b)


# ---------------------------------------------------------------------------- the oracle


def as64(x):
    """x in float64 (None stays None): the oracle's inputs."""
    return None if x is None else x.double()


def rel_err(out, ref):
    """max |out - ref| / max |ref|, in float64."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def op_selection(args, kwargs):
    """(selected, high_mask) of one recorded torch.ops.mra.attention call (see
    helpers.recording.RecordMraCalls), by the op's own selection code."""
    import mra_compile

    names = ("q", "k", "v", "mask", "num_blocks", "approx_mode", "block_size",
             "initial_prior_first_n_blocks", "initial_prior_diagonal_n_blocks", "scale", "block_per_row")
    a = dict(zip(names, args), **kwargs)
    q, k, v, mask = a.pop("q"), a.pop("k"), a.pop("v"), a.pop("mask")
    return mra_compile.block_selection(q, k, v, mask, **a)


# ---------------------------------------------------------------------------- processes


def run_python(script, *args, env=None, cwd=None, timeout=300):
    """Run ``script`` (source text) in a fresh ``sys.executable`` with ``args``; it must
    succeed. ``env``: variables set on top of this process's environment. Returns the JSON
    its last line of output holds."""
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, env=None if env is None else {**os.environ, **env},
                          cwd=cwd, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def c_library(tmp_path, source, flags):
    """The C file ``source`` (one of the kernels' C sources, built with ``flags`` and its
    functions exported: ``-DHIDDEN=``), loaded through ctypes."""
    import ctypes

    lib = tmp_path / f"{Path(source).stem}.so"
    subprocess.run(["cc", *flags, "-DHIDDEN=", "-shared", "-fPIC", str(source), "-o", str(lib)],
                   check=True)
    return ctypes.CDLL(str(lib))


def c_function(tmp_path, source, flags, name):
    """Function ``name`` of ``c_library(tmp_path, source, flags)``."""
    return getattr(c_library(tmp_path, source, flags), name)


# The head dims of the sm_80 CUDA library (``sm80_library``), as the GPU bundle ships them
# (padded to 48, 64, 80, 96, 112, 128): P V of 3 column tiles on CUDA cores (48), every
# product on tensor cores (64), the backward's [b, D] products on CUDA cores (128).
# MRA_COMPILE_EMULATION_HEAD_DIMS="40 64 128" makes the emulation a minute shorter.
CUDA_HEAD_DIMS = tuple(int(d) for d in os.environ.get("MRA_COMPILE_EMULATION_HEAD_DIMS",
                                                      "40 64 72 96 100 128").split())

# The sm_90 library's: 64, every product on tensor cores; 40 (padded to 48), P V's 3 column
# tiles do not split over 4 warps, so it stays on CUDA cores; 128, the largest common one.
SM90_HEAD_DIMS = (64, 40, 128)

# The CUDA kernel libraries the tests build with nvcc (no GPU), by fixture name: the
# arguments of ``mra-compile build --target cuda --out DIR`` for each.
CUDA_LIBRARIES = {
    # tests/test_cuda_build.py checks its device code, tests/test_cuda_emulation.py runs it.
    "sm80_library": ("--arch", "sm_80", "--head-dims", *map(str, CUDA_HEAD_DIMS)),
    # tests/test_cuda_build.py, with the grouped-query variants (enable_gqa): they must
    # compile and not spill too.
    "sm90_library": ("--arch", "sm_90", "--head-dims", *map(str, SM90_HEAD_DIMS),
                     "--grouped-heads"),
    # tests/test_cuda_emulation.py: every tuning variant of bf16, D = 64, and the
    # grouped-query variants of the default knobs (its grouped-heads cases).
    "tuning_library": ("--arch", "sm_80", "--head-dims", "64", "--dtypes", "bfloat16",
                       "--tuning-variants", "bfloat16:64", "--grouped-heads"),
}

# The libraries whose CUDA source the CPU emulation (tests/cuda_emulation) compiles with g++
# (~35 s on two cores each), by the fixture of tests/test_cuda_emulation.py that runs it.
EMULATED = {"emulation": "sm80_library", "tuning_emulation": "tuning_library"}

# The emulations themselves, by the same fixture names, registered by the test module that
# has the fixture when it is imported (collected): ``run(builds, library, workdir)``
# (``library``: the fixture's entry in ``EMULATED``) returns what the fixture returns.
# They run in the background too, after the builds (``CudaLibraryBuilds``).
EMULATION_RUNS: dict = {}

# The emulation's processes load torch beside a stand-in CUDA runtime: a CUDA build of
# torch links the real one, and fails to load there (torch 2.15.0+cu132: "undefined
# symbol: cudaDriverGetVersion, version libcudart.so.13"), so its tests skip under one.
# CI installs the CPU build and sets MRA_COMPILE_REQUIRE_NVCC=1, under which they run
# whatever torch is there (a failure, never a silent skip).
SKIP_EMULATION = (torch.version.cuda is not None
                  and not os.environ.get("MRA_COMPILE_REQUIRE_NVCC"))


class CudaLibraryBuilds:
    """The CUDA libraries ``names`` (keys of ``CUDA_LIBRARIES``) built under ``root`` one
    after another, each by its own ``mra-compile build`` process, in a background thread;
    then the emulation's builds of ``emulated`` (some of ``names``); then the emulations
    ``runs`` (keys of ``EMULATION_RUNS``).

    A build keeps one core busy for 1-2 minutes (TVM's scheduling and lowering, nvcc): on
    CI's two cores the CPU tests run beside them (``pytest_collection_modifyitems`` puts the
    files that use them last). So do the emulations (two processes, ~4 minutes on two
    cores), which had run alone at the end of the session, after the CPU tests; beside
    the CPU tests they use what a single-threaded test (a TVM compile, a subprocess's
    import) leaves of the other core. The builds see the environment of the session's
    start, not a test's monkeypatching."""

    def __init__(self, root: Path, names, emulated=(), runs=()):
        self.root = Path(root)
        self._env = dict(os.environ)
        jobs = ([("library", name) for name in names] + [("emulation", name) for name in emulated]
                + [("run", name) for name in runs])
        self._done = {job: threading.Event() for job in jobs}
        self._results: dict = {}  # job -> (what it made or None, what failed or None)
        self._lock = threading.Lock()  # (guards the two below against ``stop``)
        self._running: list[subprocess.Popen] = []
        self._stopped = False
        threading.Thread(target=self._run_all, args=(jobs,), daemon=True).start()

    def popen(self, argv, **kwargs) -> subprocess.Popen:
        """``subprocess.Popen(argv, **kwargs)`` in the session start's environment (not a
        running test's monkeypatched one) unless ``env`` is given, killed by ``stop``;
        refused (RuntimeError) once stopped."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("the session ended before it")
            proc = subprocess.Popen(argv, **{"env": self._env, **kwargs})
            self._running = [p for p in self._running if p.poll() is None] + [proc]
            return proc

    def get(self, name) -> Path:
        """The directory of library ``name``, built (here and now if it was not asked for)."""
        out, error = self._result(("library", name))
        if error:
            pytest.fail(f"building the CUDA library {name} failed: {error}")
        return out

    def emulation(self, name) -> list[str]:
        """The emulation's builds of library ``name`` (``emulator.build_emulation``)."""
        self.get(name)
        libs, error = self._result(("emulation", name))
        if error:
            pytest.fail(f"building the CPU emulation of the CUDA library {name} failed: {error}")
        return libs

    def emulated(self, name):
        """What the emulation ``name`` (a key of ``EMULATION_RUNS``) returns: waited for
        where the background thread runs it, else run here."""
        result, error = self._result(("run", name))
        if error:
            pytest.fail(f"the emulation {name} failed: {error}")
        return result

    def stop(self) -> None:
        """Start no other build and kill those running (a session that ends early, e.g.
        ``pytest -x``, leaves no compiler or emulation behind)."""
        with self._lock:
            self._stopped = True
            for proc in self._running:
                if proc.poll() is None:
                    proc.kill()

    def _result(self, job):
        """``job``'s result: waited for where the background thread runs it, else made here."""
        if job in self._done:
            self._done[job].wait()
        elif job not in self._results:
            self._results[job] = self._run(job)
        return self._results[job]

    def _run_all(self, jobs):
        for job in jobs:
            try:
                self._results[job] = self._run(job)
            finally:  # (a test waits on it, whatever happened)
                self._done[job].set()

    def _run(self, job):
        kind, name = job
        try:
            if kind == "run":
                return EMULATION_RUNS[name](self, EMULATED[name], self.root / f"{name}_run"), None
            return self._build(name) if kind == "library" else self._build_emulation(name)
        except (Exception, pytest.fail.Exception) as e:  # (reported by the test that needs it)
            return None, f"the {kind} job: {type(e).__name__}: {e}"

    def _build(self, name):
        out = self.root / name
        argv = [sys.executable, "-m", "mra_compile.cli", "build", "--target", "cuda",
                "--out", str(out), *CUDA_LIBRARIES[name]]
        try:
            proc = self.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except (OSError, RuntimeError) as e:
            return out, f"{' '.join(argv)}: {e}"
        try:
            stdout, stderr = proc.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            return out, (f"{' '.join(argv)} exited {proc.returncode}:\n"
                         f"{stdout[-3000:]}\n{stderr[-3000:]}")
        return out, None

    def _build_emulation(self, name):
        """(the emulation's shared libraries of library ``name``, or None; what failed)."""
        from cuda_emulation import emulator

        from mra_compile import library

        out, error = self._results["library", name]  # (built before)
        if error or self._stopped:
            return None, error or "the session ended before it"
        return emulator.build_emulation(out / library.CUDA_SOURCE,
                                        self.root / f"{name}_emulation"), None


def pytest_collection_modifyitems(session, config, items):
    """The test files that use a CUDA library (``CUDA_LIBRARIES``) run after all the others,
    in their order, so that the libraries' background builds (``cuda_libraries``) run
    beside the CPU tests rather than being waited for. Whole files move: their
    module-scoped fixtures are still set up once."""
    late = {item.path for item in items
            if any(n in getattr(item, "fixturenames", ()) for n in CUDA_LIBRARIES)}
    items.sort(key=lambda item: item.path in late)  # (a stable sort)


@pytest.fixture(scope="session", autouse=True)
def cuda_libraries(request, tmp_path_factory):
    """The CUDA libraries that the collected tests use (``CUDA_LIBRARIES``' fixtures, in
    the order of their first use), building from the session's start where nvcc is there."""
    names, emulated, runs = [], [], []
    for item in request.session.items:
        used = getattr(item, "fixturenames", ())
        names += [n for n in CUDA_LIBRARIES if n in used and n not in names]
        emulated += [n for f, n in EMULATED.items() if f in used and n not in emulated]
        runs += [f for f in EMULATED if f in used and f not in runs]
    if shutil.which("nvcc") is None:
        names = emulated = runs = []  # each test needing one fails or skips on its own
    if SKIP_EMULATION:
        emulated = runs = []  # (their tests skip, saying why)
    builds = CudaLibraryBuilds(tmp_path_factory.mktemp("cuda_libraries"), names, emulated, runs)
    yield builds
    builds.stop()


@pytest.fixture(scope="session")
def sm80_library(cuda_libraries):
    """The sm_80 CUDA kernel library for ``CUDA_HEAD_DIMS``."""
    return cuda_libraries.get("sm80_library")


@pytest.fixture(scope="session")
def sm90_library(cuda_libraries):
    """The sm_90 CUDA kernel library for ``SM90_HEAD_DIMS``, with the grouped-query variants."""
    return cuda_libraries.get("sm90_library")


@pytest.fixture(scope="session")
def tuning_library(cuda_libraries):
    """The sm_80 CUDA library of bf16, D = 64, with every tuning variant of its hot kernels."""
    return cuda_libraries.get("tuning_library")
