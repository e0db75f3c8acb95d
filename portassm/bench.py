"""Speed comparisons of the backends as users run them: ``python -m portassm bench``.

Every measurement here follows the same rules, so that the numbers of two backends
(or two machines) can be set side by side:

* The problem is that of a real Mamba layer: softplus on Δ, a Δ bias, the skip term D
  and the z gate, selective B and C (batch, dstate, seqlen), A = -(1 … dstate).
* Each timed function is called once before timing (compilation and autotuning stay
  out of the numbers), then repeatedly; the figure is the median. After every call
  the backend's optional ``synchronize()`` waits for queued GPU work, so a GPU time is
  the time of the work, not of the launch.
* The output of that first call is checked against the float64 NumPy reference run on
  the same (rounded) inputs; a backend that disagrees makes the command exit non-zero.
* Nothing is assumed about which backends exist: every name of
  :func:`portassm.available_backends` that runs here is measured, the others are listed
  with the reason they cannot run.

The pieces (problem generation, timing, the reference check, peak memory, the table,
the JSON report, the log-log plot) are plain functions so that the pytest-benchmark
suites in ``benchmarks/`` and the tests reuse them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

import numpy as np

from . import block, ops
from .backend import Backend, available_backends, use_backend
from .backends import BACKENDS

Array = Any

#: relative error ‖out − ref‖/‖ref‖ allowed per input dtype (DESIGN.md); half precision
#: inputs compute in float32, so only the rounding of the output is left.
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}
#: the Mamba block adds four matrix products in the input dtype to the scan
BLOCK_TOLERANCE = {"float64": 1e-11, "float32": 1e-5, "float16": 3e-2, "bfloat16": 3e-2}
DTYPES = tuple(TOLERANCE)

#: what can be timed: the forward scan, forward + backward (scan_with_vjp, then its vjp), one
#: decoding step of the scan, and the whole Mamba block forward
OPS = ("scan", "scan_vjp", "step", "block")
DEFAULT_OPS = ("scan", "block")

#: the sweeps of ``--scaling``: forward time against seqlen, and against batch
SEQLEN_SWEEP = tuple(2**k for k in range(8, 17))  # 256 … 65536
BATCH_SWEEP = (1, 2, 4, 8, 16, 32, 64)
BATCH_SWEEP_SEQLEN = 2048

#: above this many state updates (batch·dim·seqlen·dstate) a sweep point is not checked
#: against the float64 reference, whose NumPy loop would dominate the run
CHECK_LIMIT = 1 << 26


# ----------------------------------------------------------------------------- sizes and problems


@dataclass(frozen=True, order=True)
class Size:
    """A scan problem size: u is (batch, dim, seqlen), the state (batch, dim, dstate)."""

    batch: int
    dim: int
    seqlen: int
    dstate: int

    @classmethod
    def parse(cls, text: str) -> Size:
        """``"1x1536x1024x16"`` -> Size(1, 1536, 1024, 16)."""
        parts = text.lower().replace(",", "x").split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 4 or min(values) < 1:
            raise ValueError(
                f"a size is BATCHxDIMxSEQLENxDSTATE of positive integers, like 1x1536x1024x16; got {text!r}"
            )
        return cls(*values)

    def __str__(self) -> str:
        return f"{self.batch}x{self.dim}x{self.seqlen}x{self.dstate}"

    @property
    def updates(self) -> int:
        """State updates of one scan: batch·dim·seqlen·dstate."""
        return self.batch * self.dim * self.seqlen * self.dstate


DEFAULT_SIZE = Size(1, 1536, 1024, 16)


def make_problem(size: Size, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float64 inputs of :func:`portassm.scan` with the options of a real layer.

    Δ is drawn so that softplus(Δ + bias) lies around 0.005 … 0.3, the range trained
    models use; call the scan with ``delta_softplus=True``.

    Returns
    -------
    dict
        ``u, delta, z`` (batch, dim, seqlen); ``A`` (dim, dstate); ``B, C``
        (batch, dstate, seqlen); ``D, delta_bias`` (dim,).
    """
    rng = np.random.default_rng(seed)
    b, d, L, n = size.batch, size.dim, size.seqlen, size.dstate
    return {
        "u": rng.standard_normal((b, d, L)),
        "delta": rng.uniform(-4.0, -1.0, (b, d, L)),
        "A": -np.tile(np.arange(1.0, n + 1.0), (d, 1)),
        "B": rng.standard_normal((b, n, L)),
        "C": rng.standard_normal((b, n, L)),
        "D": np.ones(d),
        "z": rng.standard_normal((b, d, L)),
        "delta_bias": rng.uniform(-1.0, 1.0, d),
    }


def make_step_problem(size: Size, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float64 inputs of :func:`portassm.scan_step` (one token; seqlen is ignored).

    Returns ``state`` (batch, dim, dstate); ``x, dt, z`` (batch, dim); ``A`` (dim,
    dstate); ``B, C`` (batch, dstate); ``D, dt_bias`` (dim,). Call with ``dt_softplus=True``.
    """
    p = make_problem(Size(size.batch, size.dim, 1, size.dstate), seed)
    rng = np.random.default_rng(seed + 1)
    return {
        "state": rng.standard_normal((size.batch, size.dim, size.dstate)),
        "x": p["u"][..., 0], "dt": p["delta"][..., 0], "A": p["A"], "B": p["B"][..., 0], "C": p["C"][..., 0],
        "D": p["D"], "z": p["z"][..., 0], "dt_bias": p["delta_bias"],
    }


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` and held in float64: the exact values a backend receives.

    bfloat16 is rounded to nearest even on the float32 bits, as every library does, so
    the reference needs no bfloat16 support of its own.
    """
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
        return bits.view(np.float32).astype(np.float64)
    return np.asarray(x).astype(dtype).astype(np.float64)


def to_backend(backend: Backend, x: np.ndarray, dtype: str) -> Array:
    """A float64 NumPy array as an array of ``backend`` in ``dtype``.

    NumPy has no bfloat16: that dtype goes in as float32 and is cast by the backend's
    own library, found from its namespace or from its array type (``torch.bfloat16``).

    Raises
    ------
    TypeError
        When the backend's arrays have no such dtype.
    """
    if dtype != "bfloat16":
        return backend.asarray(np.ascontiguousarray(x, dtype=dtype))
    arr = backend.asarray(np.ascontiguousarray(x, dtype=np.float32))
    xp = backend.namespace()
    target = getattr(xp, dtype, None)
    if target is None:
        target = getattr(sys.modules.get(type(arr).__module__.split(".")[0]), dtype, None)
    if target is None:
        raise TypeError(f"{backend.name} arrays have no {dtype}")
    return xp.astype(arr, target)


def rel_err(got: Any, ref: np.ndarray) -> float:
    """‖got − ref‖/‖ref‖ in float64 (inf when got has NaN or the wrong shape)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape or not np.all(np.isfinite(got)):
        return math.inf
    scale = float(np.linalg.norm(ref))
    return float(np.linalg.norm(got - ref)) / (scale if scale > 0 else 1.0)


def synchronizer(backend: Backend, sample: Array = None) -> Callable[[], None]:
    """What waits for the backend's queued GPU work: its ``synchronize()``.

    A backend without one whose arrays (``sample``) are on a GPU still gets the wait of
    their library (``torch.cuda.synchronize``, CuPy's device synchronize): a GPU call
    timed without it would be timed at its launch. Otherwise a no-op.
    """
    sync = getattr(backend.module, "synchronize", None)
    if sync is not None:
        return sync
    library = type(sample).__module__.split(".")[0]
    if library == "torch" and sample.is_cuda:
        import torch

        return torch.cuda.synchronize
    if library == "cupy":
        import cupy

        return cupy.cuda.Device().synchronize
    return lambda: None


def describe(backend: Backend) -> str:
    describe_fn = getattr(backend.module, "describe", None)
    return describe_fn() if describe_fn is not None else "CPU"


# ----------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Seconds per call: the median and the fastest of ``runs`` timed calls."""

    median: float
    best: float
    runs: int


def time_call(
    fn: Callable[[], Any],
    sync: Callable[[], None] = lambda: None,
    *,
    repeats: int = 5,
    min_time: float = 0.2,
    max_time: float = 2.0,
) -> tuple[Timing, Any, float]:
    """Time ``fn`` after one warm-up call.

    Calls go on until ``repeats`` calls and ``min_time`` seconds are done (so fast calls
    get many samples), but stop once ``max_time`` seconds are spent (so a slow backend,
    at seconds a call, gets as many calls as fit, at least one, and does not hold the
    comparison up). ``sync`` runs after every call, inside the timed interval.

    Returns
    -------
    timing : Timing
    first : the warm-up call's result (used for the agreement check)
    first_seconds : float
        The warm-up call's time, compilation included.
    """
    start = time.perf_counter()
    first = fn()
    sync()
    first_seconds = time.perf_counter() - start
    times: list[float] = []
    begin = time.perf_counter()
    while True:
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        elapsed = time.perf_counter() - begin
        n = len(times)
        if (n >= repeats and elapsed >= min_time) or elapsed >= max_time or n >= 1000 * repeats:
            break
    return Timing(statistics.median(times), min(times), len(times)), first, first_seconds


# ----------------------------------------------------------------------------- the operations


@dataclass
class Job:
    """One operation of one size, ready to run on any backend.

    ``inputs`` are float64 NumPy arrays already rounded to ``dtype``; ``run(backend,
    arrays)`` calls portassm on the backend's arrays and returns NumPy results in the
    order of ``reference()``.
    """

    op: str
    size: Size
    dtype: str
    inputs: dict[str, np.ndarray]
    run: Callable[[Any, dict[str, Array]], Callable[[], Any]]
    outputs: Callable[[Any, Any], list[np.ndarray]]
    tolerance: float
    _reference: list[np.ndarray] | None = field(default=None, repr=False)

    def reference(self) -> list[np.ndarray]:
        """The float64 NumPy results on the same inputs (computed once)."""
        if self._reference is None:
            with use_backend("numpy") as numpy_backend:
                self._reference = self.outputs(numpy_backend, self.run(numpy_backend, self.inputs)())
        return self._reference

    def convert(self, backend: Backend) -> dict[str, Array]:
        return {name: to_backend(backend, value, self.dtype) for name, value in self.inputs.items()}


def _scan_outputs(backend: Any, result: Any) -> list[np.ndarray]:
    out, last = result
    return [backend.to_numpy(out), backend.to_numpy(last)]


def _vjp_outputs(backend: Any, result: Any) -> list[np.ndarray]:
    (out, _), grads = result
    return [backend.to_numpy(out), *(backend.to_numpy(g) for g in grads if g is not None)]


def _step_outputs(backend: Any, result: Any) -> list[np.ndarray]:
    return [backend.to_numpy(r) for r in result]


def _block_outputs(backend: Any, result: Any) -> list[np.ndarray]:
    return [backend.to_numpy(result)]


def make_job(
    op: str, size: Size, dtype: str, *, seed: int = 0, d_model: int | None = None, block_seqlen: int = 256
) -> Job:
    """The job of ``op`` at ``size`` in ``dtype``.

    ``block`` runs a Mamba block of width ``d_model`` (default dim // 2, so that its
    inner width, expand·d_model, is ``dim``) with d_state = dstate over ``block_seqlen``
    tokens (0: the size's seqlen).
    """
    if op in ("scan", "scan_vjp"):
        inputs = {k: round_to(v, dtype) for k, v in make_problem(size, seed).items()}
        if op == "scan":
            def run(backend, a):
                return lambda: ops.scan(**a, delta_softplus=True, return_last_state=True)

            return Job(op, size, dtype, inputs, run, _scan_outputs, TOLERANCE[dtype])
        rng = np.random.default_rng(seed + 2)
        inputs["dout"] = round_to(rng.standard_normal((size.batch, size.dim, size.seqlen)), dtype)

        def run(backend, a):
            args = {k: v for k, v in a.items() if k != "dout"}

            def forward_backward():
                out, last, vjp = ops.scan_with_vjp(**args, delta_softplus=True, return_last_state=True)
                return (out, last), vjp(a["dout"])

            return forward_backward

        return Job(op, size, dtype, inputs, run, _vjp_outputs, TOLERANCE[dtype])
    if op == "step":
        inputs = {k: round_to(v, dtype) for k, v in make_step_problem(size, seed).items()}

        def run(backend, a):
            return lambda: ops.scan_step(**a, dt_softplus=True)

        return Job(op, size, dtype, inputs, run, _step_outputs, TOLERANCE[dtype])
    if op == "block":
        width = d_model or max(1, size.dim // 2)
        seqlen = block_seqlen or size.seqlen
        with use_backend("numpy"):
            params = block.init_block_params(width, d_state=size.dstate, seed=seed, dtype="float64")
        rng = np.random.default_rng(seed + 3)
        inputs = {"x": rng.standard_normal((size.batch, seqlen, width))}
        inputs.update({"param:" + k: v for k, v in params.items()})
        inputs = {k: round_to(v, dtype) for k, v in inputs.items()}

        def run(backend, a):
            p = {k[len("param:"):]: v for k, v in a.items() if k.startswith("param:")}
            return lambda: block.mamba_block(a["x"], p)

        return Job(op, size, dtype, inputs, run, _block_outputs, BLOCK_TOLERANCE[dtype])
    raise ValueError(f"unknown operation {op!r}; known: {', '.join(OPS)}")


# ----------------------------------------------------------------------------- peak memory


def _rss_reset() -> int | None:
    """Reset the process's peak resident set (Linux) and return the current one, in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmRSS")
    except OSError:
        return None


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory(fn: Callable[[], Any], sample: Array, sync: Callable[[], None]) -> tuple[int | None, str]:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before it.

    The method follows where ``sample`` (an input array) lives: tracemalloc for NumPy
    arrays (NumPy and Numba's runtime report their buffers to it), the CUDA caching
    allocator's peak for torch CUDA tensors, a counting allocator over CuPy's memory pool
    for CuPy arrays, and the process's peak resident set (Linux, approximate: the C
    allocator may reuse freed pages) for torch CPU tensors.

    Returns
    -------
    peak : int or None
        Bytes, None when no method applies here.
    method : str
    """
    library = type(sample).__module__.split(".")[0]
    if library == "numpy":
        started = tracemalloc.is_tracing()
        if not started:
            tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            result = fn()
            sync()
            peak = tracemalloc.get_traced_memory()[1] - base
            del result
        finally:
            if not started:
                tracemalloc.stop()
        return peak, "tracemalloc"
    if library == "torch":
        import torch

        if sample.is_cuda:
            sync()
            torch.cuda.synchronize(sample.device)
            torch.cuda.reset_peak_memory_stats(sample.device)
            base = torch.cuda.memory_allocated(sample.device)
            result = fn()
            torch.cuda.synchronize(sample.device)
            peak = torch.cuda.max_memory_allocated(sample.device) - base
            del result
            return peak, "torch.cuda.max_memory_allocated"
        base = _rss_reset()
        if base is None:
            return None, "no method on this OS"
        result = fn()
        peak = (_proc_status("VmHWM") or base) - base
        del result
        return peak, "peak RSS (approximate)"
    if library == "cupy":
        import cupy

        pool = cupy.get_default_memory_pool()
        sync()
        base = pool.used_bytes()
        peak = [base]

        def counting_malloc(nbytes: int):
            memory = pool.malloc(nbytes)
            peak[0] = max(peak[0], pool.used_bytes())
            return memory

        cupy.cuda.set_allocator(counting_malloc)
        try:
            result = fn()
            sync()
            del result
        finally:
            cupy.cuda.set_allocator(pool.malloc)
        return peak[0] - base, "cupy memory pool"
    return None, f"no method for {library} arrays"


def nbytes(arrays: Iterable[Any]) -> int:
    """Total bytes of arrays of any library."""
    total = 0
    for a in arrays:
        n = getattr(a, "nbytes", None)
        if n is None:  # torch
            n = a.numel() * a.element_size()
        total += int(n)
    return total


# ----------------------------------------------------------------------------- running


@dataclass
class Result:
    """One measured (or skipped) operation on one backend at one size."""

    backend: str
    op: str
    size: str
    batch: int
    dim: int
    seqlen: int
    dstate: int
    dtype: str
    sweep: str
    status: str  # "ok", "disagrees", "skipped", "error"
    median_ms: float | None = None
    best_ms: float | None = None
    runs: int = 0
    first_call_ms: float | None = None
    updates_per_s: float | None = None
    rel_err: float | None = None
    tolerance: float | None = None
    device: str = ""
    note: str = ""


@dataclass
class MemoryResult:
    """Peak memory of forward and of forward + backward on one backend at one size."""

    backend: str
    size: str
    dtype: str
    inputs_bytes: int
    outputs_bytes: int
    forward_peak_bytes: int | None
    forward_backward_peak_bytes: int | None
    method: str
    note: str = ""


@dataclass
class Settings:
    """What one ``bench`` run measures (the command-line options)."""

    backends: list[str] | None = None
    sizes: list[Size] = field(default_factory=lambda: [DEFAULT_SIZE])
    dtype: str = "float32"
    ops: tuple[str, ...] = DEFAULT_OPS
    scaling: bool = False
    memory: bool = False
    repeats: int = 5
    max_time: float = 2.0
    budget: float = 20.0
    seed: int = 0
    d_model: int | None = None
    block_seqlen: int = 256


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__ or "out of memory" in str(exc).lower()


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 300 else text[:297] + "..."


class Runner:
    """Runs jobs on backends, remembering per-backend state (dtype support, sweep budgets)."""

    def __init__(self, settings: Settings, progress: Any = None, task: Any = None):
        self.settings = settings
        self.progress, self.task = progress, task
        self.results: list[Result] = []
        self.memory: list[MemoryResult] = []
        self.skipped: dict[str, str] = {}
        self._unsupported: dict[tuple[str, str, str], str] = {}
        self._last: dict[tuple[str, str, str], tuple[int, float]] = {}

    def backends(self) -> list[str]:
        reasons = available_backends()
        wanted = self.settings.backends or list(BACKENDS)
        for name in wanted:
            if name not in reasons:
                raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(reasons)}")
            if reasons[name] is not None:
                self.skipped[name] = reasons[name]
        return [name for name in wanted if reasons[name] is None]

    def _advance(self, description: str | None = None) -> None:
        if self.progress is not None:
            if description is not None:
                self.progress.update(self.task, description=description)
            else:
                self.progress.advance(self.task)

    def _supports(self, backend: Backend, op: str, dtype: str) -> str | None:
        """Why ``op`` cannot take ``dtype`` inputs on this backend, or None.

        Tried at a tiny size. Only a refusal that names the dtype (the backend's arrays lack
        it, or a kernel says so with a TypeError, ValueError or NotImplementedError) counts:
        any other failure is left for the real run to report as an error.
        """
        key = (backend.name, op, dtype)
        if key not in self._unsupported:
            self._unsupported[key] = ""
            tiny = make_job(op, Size(1, 4, 8, 2), dtype, seed=1, d_model=2, block_seqlen=8)
            try:
                arrays = tiny.convert(backend)
            except TypeError as exc:
                self._unsupported[key] = f"{dtype} not supported: {_short(exc)}"
                return self._unsupported[key]
            try:
                tiny.run(backend, arrays)()
            except (TypeError, ValueError, NotImplementedError) as exc:
                if dtype in str(exc):
                    self._unsupported[key] = f"{dtype} not supported: {_short(exc)}"
            except Exception:  # noqa: BLE001 - reported by the real run
                pass
        return self._unsupported[key] or None

    def over_budget(self, name: str, op: str, size: Size, sweep: str) -> str | None:
        """Why a sweep point is skipped on a backend: its call time, predicted linearly from
        the previous point, is over the budget. None when it runs."""
        last = self._last.get((name, op, sweep))
        if last is None or sweep == "sizes":
            return None
        updates, seconds = last
        predicted = seconds * size.updates / updates
        if predicted <= self.settings.budget:
            return None
        return f"predicted {predicted:.0f} s a call from the previous point, over --budget {self.settings.budget:g} s"

    def skip(self, name: str, op: str, size: Size, sweep: str, note: str) -> Result:
        """Record ``op`` at ``size`` on backend ``name`` as skipped, for ``note``'s reason."""
        s = size
        result = Result(name, op, str(s), s.batch, s.dim, s.seqlen, s.dstate, self.settings.dtype, sweep, "skipped",
                        note=note)
        self.results.append(result)
        return result

    def run_job(self, job: Job, name: str, *, sweep: str = "sizes", check: bool = True) -> Result:
        """Time ``job`` on backend ``name`` and check it against the reference."""
        s = job.size
        result = self.skip(name, job.op, s, sweep, "")  # until it has run
        with use_backend(name) as backend:
            result.device = describe(backend)
            reason = self._supports(backend, job.op, job.dtype)
            if reason is not None:
                result.note = reason
                return result
            try:
                arrays = job.convert(backend)
                sync = synchronizer(backend, next(iter(arrays.values())))
                fn = job.run(backend, arrays)
                timing, first, first_seconds = time_call(
                    fn, sync, repeats=self.settings.repeats, max_time=self.settings.max_time
                )
                got = job.outputs(backend, first)
                del first, fn, arrays
            except Exception as exc:
                result.status = "skipped" if _is_oom(exc) else "error"
                result.note = ("out of memory: " if _is_oom(exc) else "") + _short(exc)
                return result
        self._last[(name, job.op, sweep)] = (s.updates, timing.median)
        result.median_ms, result.best_ms, result.runs = timing.median * 1e3, timing.best * 1e3, timing.runs
        result.first_call_ms = first_seconds * 1e3
        if job.op in ("scan", "scan_vjp"):
            result.updates_per_s = s.updates / timing.median
        elif job.op == "step":
            result.updates_per_s = s.batch * s.dim * s.dstate / timing.median
        result.status = "ok"
        if check:
            ref = job.reference()
            errors = [rel_err(g, r) for g, r in zip(got, ref, strict=True)] if len(got) == len(ref) else [math.inf]
            result.rel_err = max(errors)
            result.tolerance = job.tolerance
            if not result.rel_err <= job.tolerance:
                result.status = "disagrees"
        else:
            result.note = "not checked (large sweep point)"
        return result

    def run_memory(self, name: str, size: Size) -> MemoryResult:
        """Peak memory of ``scan`` and of ``scan`` + ``scan_vjp`` on one backend."""
        dtype = self.settings.dtype
        job = make_job("scan_vjp", size, dtype, seed=self.settings.seed)
        with use_backend(name) as backend:
            reason = self._supports(backend, "scan_vjp", dtype)
            if reason is not None:
                entry = MemoryResult(name, str(size), dtype, 0, 0, None, None, "", reason)
                self.memory.append(entry)
                return entry
            entry = MemoryResult(name, str(size), dtype, 0, 0, None, None, "")
            try:
                arrays = job.convert(backend)
                sync = synchronizer(backend, arrays["u"])
                args = {k: v for k, v in arrays.items() if k != "dout"}
                entry.inputs_bytes = nbytes(args.values())

                def forward():
                    return ops.scan(**args, delta_softplus=True, return_last_state=True)

                both = job.run(backend, arrays)
                both()  # warm-up: compilation and caches stay out of the peak
                sync()
                entry.outputs_bytes = nbytes(forward())
                entry.forward_peak_bytes, entry.method = peak_memory(forward, arrays["u"], sync)
                entry.forward_backward_peak_bytes, _ = peak_memory(both, arrays["u"], sync)
            except Exception as exc:  # noqa: BLE001 - reported in the table, beside the others
                entry.note = _short(exc)
        self.memory.append(entry)
        return entry


def plan(settings: Settings) -> list[tuple[str, Size]]:
    """The (sweep, size) pairs of a run, in order (each sweep ascending).

    With ``scaling``, the first size gives the batch of the seqlen sweep and the dim and
    dstate of both sweeps; the sizes themselves are not run.
    """
    if not settings.scaling:
        return [("sizes", s) for s in settings.sizes]
    base = settings.sizes[0]
    return [("seqlen", Size(base.batch, base.dim, L, base.dstate)) for L in SEQLEN_SWEEP] + [
        ("batch", Size(b, base.dim, BATCH_SWEEP_SEQLEN, base.dstate)) for b in BATCH_SWEEP
    ]


def run(settings: Settings, progress: Any = None) -> tuple[Runner, list[str]]:
    """Run every job of ``settings``; return the runner (results) and the backends measured."""
    task = None
    runner = Runner(settings, progress)
    names = runner.backends()
    points = plan(settings)
    jobs_total = sum(len(settings.ops if sweep == "sizes" else ("scan",)) for sweep, _ in points) * len(names)
    if progress is not None:
        task = progress.add_task("preparing", total=jobs_total + (len(names) if settings.memory else 0))
        runner.task = task
    for sweep, size in points:
        for op in settings.ops if sweep == "sizes" else ("scan",):
            job = None  # inputs are made once per point, and only when some backend runs it
            check = sweep == "sizes" or size.updates <= CHECK_LIMIT
            for name in names:
                note = runner.over_budget(name, op, size, sweep)
                if note is not None:
                    runner.skip(name, op, size, sweep, note)
                else:
                    if job is None:
                        runner._advance(f"{op} {size} {settings.dtype}: preparing inputs")
                        job = make_job(op, size, settings.dtype, seed=settings.seed, d_model=settings.d_model,
                                       block_seqlen=settings.block_seqlen)
                    runner._advance(f"{op} {size} {settings.dtype}: {name}")
                    runner.run_job(job, name, sweep=sweep, check=check)
                runner._advance()
            del job
    if settings.memory:
        for name in names:
            runner._advance(f"peak memory {settings.sizes[0]}: {name}")
            runner.run_memory(name, settings.sizes[0])
            runner._advance()
    return runner, names


# ----------------------------------------------------------------------------- reports


def machine() -> dict[str, Any]:
    """Where the numbers were measured: platform, CPUs, Python and library versions."""
    libraries = {}
    for dist in ("numpy", "numba", "torch", "triton", "cupy-cuda12x", "cupy-cuda13x", "mambapy"):
        try:
            libraries[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "libraries": libraries,
    }


def report(runner: Runner, settings: Settings, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Everything a run measured, as one JSON-ready dict."""
    from . import __version__

    return {
        "portassm": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m portassm bench " + " ".join(argv or []),
        "machine": machine(),
        "dtype": settings.dtype,
        "ops": list(settings.ops),
        "d_model": settings.d_model,
        "block_seqlen": settings.block_seqlen,
        "repeats": settings.repeats,
        "max_time": settings.max_time,
        "problem": "delta_softplus=True, delta_bias, D, z; selective B, C (batch, dstate, seqlen); A = -(1..dstate)",
        "timing": f"median of >= {settings.repeats} calls after one warm-up call (as many as fit in "
        f"{settings.max_time:g} s, at least one, when a call is slow); "
        "synchronize() after each call",
        "tolerance": TOLERANCE[settings.dtype],
        "results": [asdict(r) for r in runner.results],
        "memory": [asdict(m) for m in runner.memory],
        "unavailable": runner.skipped,
    }


def failed(runner: Runner) -> list[Result]:
    """Results that make the command fail: disagreement with the reference, or an error."""
    return [r for r in runner.results if r.status in ("disagrees", "error")]


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _cell(r: Result | None) -> str:
    if r is None:
        return ""
    if r.status in ("ok", "disagrees"):
        return _ms(r.median_ms) + (" ✗" if r.status == "disagrees" else "")
    return r.status


def tables(runner: Runner, settings: Settings, markdown: bool = False) -> list[tuple[str, list[str], list[list[str]]]]:
    """The tables of a run as (title, header, rows): one per size, one per sweep, one for memory."""
    out: list[tuple[str, list[str], list[list[str]]]] = []
    by_key = {(r.sweep, r.size, r.backend, r.op): r for r in runner.results}
    names = list(dict.fromkeys(r.backend for r in runner.results))
    sizes = list(dict.fromkeys(r.size for r in runner.results if r.sweep == "sizes"))
    ops_run = [op for op in settings.ops if any(r.op == op for r in runner.results)]
    for size in sizes:
        header = ["backend"]
        for op in ops_run:
            header += [f"{op} ms", f"{op} rel err"]
            if op == "scan":
                header.insert(len(header) - 1, "G updates/s")
        header.append("device / note")
        rows = []
        for name in names:
            row, notes = [name], []
            for op in ops_run:
                r = by_key.get(("sizes", size, name, op))
                if r is None:
                    row += ["-", "-"] + (["-"] if op == "scan" else [])
                    continue
                row.append(_cell(r))
                if op == "scan":
                    row.append("-" if r.updates_per_s is None else f"{r.updates_per_s / 1e9:.3g}")
                row.append("-" if r.rel_err is None else f"{r.rel_err:.1e}")
                if r.note and r.note not in notes:
                    notes.append(r.note)
            device = next((r.device for r in runner.results if r.backend == name and r.device), "")
            row.append("; ".join([device, *notes]) if notes else device)
            rows.append(row)
        labels = {op: make_label(op, size, settings) for op in ops_run}
        title = f"{size} (batch x dim x seqlen x dstate), {settings.dtype}: " + "; ".join(labels.values())
        out.append((title, header, rows))
    for sweep, axis in (("seqlen", "seqlen"), ("batch", "batch")):
        points = sorted({getattr(r, axis) for r in runner.results if r.sweep == sweep})
        if not points:
            continue
        sample = next(r for r in runner.results if r.sweep == sweep)
        fixed = (f"batch {sample.batch}" if axis == "seqlen" else f"seqlen {sample.seqlen}")
        header = ["backend", *[str(p) for p in points], "growth exponent"]
        rows = []
        for name in names:
            found = {getattr(r, axis): r for r in runner.results if r.sweep == sweep and r.backend == name}
            rows.append([name, *[_cell(found.get(p)) for p in points], _exponent(list(found.values()), axis)])
        title = (f"scan forward ms against {axis} ({fixed}, dim {sample.dim}, dstate {sample.dstate}, "
                 f"{settings.dtype}); growth exponent: slope of log time against log {axis} over the upper half")
        out.append((title, header, rows))
    if runner.memory:
        header = ["backend", "inputs MB", "outputs MB", "forward peak MB", "forward+backward peak MB", "method"]
        rows = [
            [m.backend, _mb(m.inputs_bytes), _mb(m.outputs_bytes), _mb(m.forward_peak_bytes),
             _mb(m.forward_backward_peak_bytes), "; ".join(x for x in (m.method, m.note) if x)]
            for m in runner.memory
        ]
        title = (f"peak memory above the inputs at {runner.memory[0].size}, {settings.dtype}: scan, "
                 "and scan_with_vjp + its vjp (outputs and gradients included)")
        out.append((title, header, rows))
    if runner.skipped:
        out.append(("unavailable backends", ["backend", "reason"], [[k, v] for k, v in runner.skipped.items()]))
    return out


def make_label(op: str, size: Size | str, settings: Settings) -> str:
    if op == "block":
        s = Size.parse(str(size))
        return f"block d_model {settings.d_model or max(1, s.dim // 2)}, seqlen {settings.block_seqlen or s.seqlen}"
    return {"scan": "scan forward", "scan_vjp": "scan_with_vjp then vjp", "step": "scan_step"}[op]


def _exponent(results: list[Result], axis: str) -> str:
    """Least-squares slope of log(time) against log(axis) over the upper half of the points."""
    pts = sorted((getattr(r, axis), r.median_ms) for r in results if r.median_ms)
    pts = pts[len(pts) // 2 :] if len(pts) >= 4 else pts
    if len(pts) < 2:
        return "-"
    x = np.log([p[0] for p in pts])
    y = np.log([p[1] for p in pts])
    return f"{np.polyfit(x, y, 1)[0]:.2f}"


def print_tables(runner: Runner, settings: Settings, console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    for title, header, rows in tables(runner, settings):
        table = Table(title=escape(title))
        for i, column in enumerate(header):
            table.add_column(escape(column), justify="left" if i == 0 or column.startswith("device") else "right")
        for row in rows:
            table.add_row(*(escape(c) for c in row))
        console.print(table)


def markdown(runner: Runner, settings: Settings) -> str:
    """The tables as Markdown, for docs/benchmarks.md."""
    parts = []
    for title, header, rows in tables(runner, settings):
        lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def plot(runner: Runner, settings: Settings, path: str) -> None:
    """Log-log plot of time against seqlen per backend (and against batch after ``--scaling``).

    Without a sweep the points are the ``--sizes`` that differ in seqlen only.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in runner.results if r.median_ms is not None]
    panels = [("seqlen", [r for r in ok if r.sweep == "seqlen"]), ("batch", [r for r in ok if r.sweep == "batch"])]
    panels = [(axis, rs) for axis, rs in panels if rs]
    if not panels:
        panels = [("seqlen", [r for r in ok if r.sweep == "sizes"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (axis, rs) in zip(axes[0], panels, strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rs:
            label = r.backend if len({x.op for x in rs}) == 1 else f"{r.backend} {r.op}"
            series.setdefault(label, []).append((getattr(r, axis), r.median_ms))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if series:  # slope 1 from the first point of the longest series: what linear growth looks like
            longest = max(series.values(), key=len)
            (x0, y0), x1 = longest[0], longest[-1][0]
            ax.plot([x0, x1], [y0, y0 * x1 / x0], "k--", lw=0.8, label="linear")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel("ms per call (median)")
        sample = rs[0] if rs else None
        if sample is not None:
            fixed = (f"batch {sample.batch}" if axis == "seqlen" else f"seqlen {sample.seqlen}")
            ax.set_title(f"scan forward, {fixed}, dim {sample.dim}, dstate {sample.dstate}, {sample.dtype}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m portassm bench``."""
    parser.add_argument("--backends", nargs="+", metavar="NAME",
                        help=f"backends to run (default: every one that runs here; known: {', '.join(BACKENDS)})")
    parser.add_argument("--sizes", nargs="+", type=Size.parse, metavar="BxDxLxN",
                        help=f"scan sizes batch x dim x seqlen x dstate (default {DEFAULT_SIZE})")
    parser.add_argument("--size", nargs=4, type=int, metavar=("BATCH", "DIM", "SEQLEN", "DSTATE"),
                        help="one size, as four numbers (same as --sizes BxDxLxN)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="input dtype; a backend without it is listed as skipped (default float32)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(DEFAULT_OPS),
                        help="operations: scan (forward), scan_vjp (forward then backward: scan_with_vjp), step (one decoding "
                        "token), block (the Mamba block); default: scan block")
    parser.add_argument("--scaling", action="store_true",
                        help=f"scan forward against seqlen {SEQLEN_SWEEP[0]}…{SEQLEN_SWEEP[-1]} and against batch "
                        f"{BATCH_SWEEP[0]}…{BATCH_SWEEP[-1]} (seqlen {BATCH_SWEEP_SEQLEN}) instead of the sizes; "
                        "the first size gives dim, dstate and the batch of the seqlen sweep")
    parser.add_argument("--memory", action="store_true",
                        help="peak memory of forward and forward+backward per backend at the first size")
    parser.add_argument("--json", metavar="FILE", help="write every result as JSON")
    parser.add_argument("--plot", metavar="FILE",
                        help="log-log plot of time against seqlen (matplotlib), e.g. scan.png")
    parser.add_argument("--markdown", metavar="FILE", help="write the tables as Markdown")
    parser.add_argument("--from-json", metavar="FILE",
                        help="measure nothing: print the tables of a saved --json report (and write --markdown, "
                        "--plot from it), e.g. to plot on a machine with matplotlib what a GPU machine measured")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement, at least (default 5)")
    parser.add_argument("--max-time", type=float, default=2.0,
                        help="seconds of timed calls after which a measurement stops, with at least one call "
                        "(default 2)")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="sweeps skip a point whose predicted call time exceeds this many seconds (default 20)")
    parser.add_argument("--d-model", type=int, default=None, help="block width (default dim // 2: 768 for dim 1536)")
    parser.add_argument("--block-seqlen", type=int, default=256,
                        help="block tokens (default 256; 0: the size's seqlen)")
    parser.add_argument("--seed", type=int, default=0)


class _PlainConsole:
    """``print`` with rich's colour markup removed, for machines without rich."""

    def print(self, text: str) -> None:
        import re

        print(re.sub(r"\[/?(red|green|bold)\]", "", text))


def load_report(path: str, settings: Settings) -> tuple[Runner, Settings, dict[str, Any]]:
    """A saved ``--json`` report as a runner holding its results, and the settings it ran with."""
    with open(path) as f:
        data = json.load(f)
    for key in ("dtype", "d_model", "block_seqlen", "repeats", "max_time"):
        if key in data:
            setattr(settings, key, data[key])
    settings.ops = tuple(data.get("ops", settings.ops))
    runner = Runner(settings)
    runner.results = [Result(**r) for r in data["results"]]
    runner.memory = [MemoryResult(**m) for m in data.get("memory", [])]
    runner.skipped = dict(data.get("unavailable", {}))
    return runner, settings, data


def settings_from_args(args: argparse.Namespace) -> Settings:
    sizes = list(args.sizes or [])
    if args.size:
        sizes.append(Size(*args.size))
    return Settings(
        backends=args.backends, sizes=sizes or [DEFAULT_SIZE], dtype=args.dtype, ops=tuple(args.ops),
        scaling=args.scaling, memory=args.memory, repeats=args.repeats, max_time=args.max_time,
        budget=args.budget, seed=args.seed, d_model=args.d_model, block_seqlen=args.block_seqlen,
    )


def main(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """``python -m portassm bench``: measure, print the tables, write the files; 1 on a disagreement."""
    try:
        from rich.console import Console
    except ImportError:  # a bare machine (a lent GPU, say): plain text, no progress bar
        Console = None
    console = Console() if Console is not None else _PlainConsole()
    settings = settings_from_args(args)
    if args.from_json:
        runner, settings, data = load_report(args.from_json, settings)
    else:
        try:
            if Console is not None:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
                with Progress(*columns, console=console, transient=True) as progress:
                    runner, _ = run(settings, progress)
            else:
                runner, _ = run(settings)
        except ValueError as exc:
            console.print(f"[red]{exc}[/red]")
            return 2
        data = report(runner, settings, argv)
    if Console is not None:
        print_tables(runner, settings, console)
    else:
        console.print(markdown(runner, settings))
    console.print(
        f"times: median ms of >= {settings.repeats} calls after a warm-up call (of those that fit in "
        f"{settings.max_time:g} s when a call is slow); "
        f"rel err: max ‖out − ref‖/‖ref‖ over the outputs against the NumPy reference in float64 "
        f"(target ≤ {TOLERANCE[settings.dtype]:g} in {settings.dtype}, block ≤ {BLOCK_TOLERANCE[settings.dtype]:g})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
        console.print(f"wrote {args.json}")
    if args.markdown:
        m = data["machine"]
        with open(args.markdown, "w") as f:
            f.write(f"`{data['command'].strip()}`, {data['date']}, {m.get('cpu') or m['processor']}, "
                    f"{m['cpus']} CPUs\n\n" + markdown(runner, settings))
        console.print(f"wrote {args.markdown}")
    if args.plot:
        try:
            plot(runner, settings, args.plot)
            console.print(f"wrote {args.plot}")
        except ImportError as exc:  # the measurement stands; the plot can be made later from the JSON
            console.print(f"[red]no plot: {exc}; pip install matplotlib, then: python -m portassm bench "
                          f"--from-json FILE --plot {args.plot}[/red]")
    bad = failed(runner)
    if bad:
        console.print("[red]failed: " + ", ".join(
            f"{r.backend} {r.op} {r.size} ({r.status}{': ' + r.note if r.note else ''})" for r in bad) + "[/red]")
        return 1
    return 0
