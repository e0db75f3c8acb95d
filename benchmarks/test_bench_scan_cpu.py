"""The numba backend against the sequential PyTorch loop, on the CPU (pytest-benchmark).

Batch 1, dim 1536, dstate 16, float32, delta_softplus with z, D and delta_bias: the
size of ANCHORS.md's CPU table. Each table (``--benchmark-group-by=group``) holds numba
and, when torch is installed, the HF-style loop of ``baselines.sequential_scan`` (the
materialised Ā and B̄u, then one small product per token), so their ratio is read off
one run::

    pytest benchmarks/test_bench_scan_cpu.py --benchmark-only --benchmark-group-by=group

``python scripts/bench_numba_table.py`` prints the same figures as G state updates/s
with the ratios the numba issue asks for.
"""

from __future__ import annotations

import numpy as np
import pytest

import portassm
from portassm.bench import Size, make_problem, make_step_problem

SEQLENS = (1024, 4096)
DIM, DSTATE = 1536, 16


def _problem(seqlen: int) -> dict[str, np.ndarray]:
    p = {k: v.astype(np.float32) for k, v in make_problem(Size(1, DIM, seqlen, DSTATE)).items()}
    return {**p, "delta_softplus": True}


@pytest.fixture(scope="module")
def numba_backend():
    reason = portassm.available_backends()["numba"]
    if reason is not None:
        pytest.skip(f"numba unavailable: {reason}")
    with portassm.use_backend("numba") as backend:
        yield backend


def _torch():
    return pytest.importorskip("torch", reason="the PyTorch loop needs torch")


def _info(benchmark, seqlen: int) -> None:
    benchmark.extra_info["state_updates"] = DIM * seqlen * DSTATE
    benchmark.extra_info["unit"] = "divide state_updates by the time for updates/s"


@pytest.mark.parametrize("seqlen", SEQLENS)
def test_forward_numba(benchmark, numba_backend, seqlen):
    benchmark.group = f"forward L={seqlen}"
    p = _problem(seqlen)
    portassm.scan(**p)  # compile (or load from the cache) outside the timing
    _info(benchmark, seqlen)
    benchmark.pedantic(lambda: portassm.scan(**p), rounds=10, warmup_rounds=1)


@pytest.mark.parametrize("seqlen", SEQLENS)
def test_forward_torch_loop(benchmark, seqlen):
    torch = _torch()
    from baselines import sequential_scan

    benchmark.group = f"forward L={seqlen}"
    p = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in _problem(seqlen).items()}
    _info(benchmark, seqlen)
    with torch.no_grad():
        benchmark.pedantic(lambda: sequential_scan(**p), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("seqlen", SEQLENS)
def test_forward_backward_numba(benchmark, numba_backend, seqlen):
    benchmark.group = f"forward+backward L={seqlen}"
    p = _problem(seqlen)
    dout = np.random.default_rng(1).standard_normal(p["u"].shape).astype(np.float32)

    def forward_backward():
        _, vjp = portassm.scan_with_vjp(**p)
        return vjp(dout)

    forward_backward()
    _info(benchmark, seqlen)
    benchmark.pedantic(forward_backward, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("seqlen", SEQLENS)
def test_forward_backward_torch_loop(benchmark, seqlen):
    torch = _torch()
    from baselines import sequential_scan

    benchmark.group = f"forward+backward L={seqlen}"
    p = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in _problem(seqlen).items()}
    for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"):
        p[name].requires_grad_(True)
    dout = torch.randn(p["u"].shape)

    def forward_backward():
        sequential_scan(**p).backward(dout)

    _info(benchmark, seqlen)
    benchmark.pedantic(forward_backward, rounds=2, warmup_rounds=1)


def _step_problem() -> dict[str, np.ndarray]:
    p = {k: v.astype(np.float32) for k, v in make_step_problem(Size(1, DIM, 1, DSTATE)).items()}
    return {**p, "dt_softplus": True}


def test_step_numba(benchmark, numba_backend):
    """ops.scan_step: validation and dispatch included, as a decoder calls it."""
    benchmark.group = "scan_step batch=1 dim=1536"
    p = _step_problem()
    portassm.scan_step(**p)
    benchmark(lambda: portassm.scan_step(**p))


def test_step_numba_kernel_only(benchmark, numba_backend):
    """The backend's scan_step alone: what ops.scan_step adds is the difference to the row above."""
    benchmark.group = "scan_step batch=1 dim=1536"
    p = _step_problem()
    args = [p[k] for k in ("state", "x", "dt", "A")] + [p["B"][:, None], p["C"][:, None]]
    args += [p["D"], p["z"], p["dt_bias"], True, "mamba"]
    numba_backend.scan_step(*args)
    benchmark(lambda: numba_backend.scan_step(*args))


def test_step_torch_loop(benchmark):
    torch = _torch()
    from baselines import sequential_step

    benchmark.group = "scan_step batch=1 dim=1536"
    p = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in _step_problem().items()}
    with torch.no_grad():
        benchmark(lambda: sequential_step(**p))
