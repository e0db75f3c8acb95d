"""Speed of every operation on every backend, with the baselines in the same tables.

One table (pytest-benchmark group) per operation, size and dtype: ``scan``,
``scan_vjp`` (forward then backward: ``scan_with_vjp`` and its ``vjp``), ``step`` (one decoding token of the scan),
``block`` (the Mamba block forward) and ``decode`` (one token of a whole MambaLM).
Rows are portassm's backends (``numpy``, ``numba``, ``torch``, ``cupy`` …, whatever
:data:`portassm.backends.BACKENDS` lists), ``torch-autograd`` (the torch backend
differentiated by torch autograd, as torch users train) and the baselines of
``baselines.py``. Every row is warmed up (compiled) and checked against the float64
reference before it is timed; GPU work is synchronised inside each timed call.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from portassm import bench
from portassm.backends import BACKENDS

SCAN_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
IMPLS = (*BACKENDS, "baseline-torch-loop", "baseline-mambapy")


def _group(op: str, size: bench.Size, dtype: str) -> str:
    return f"{op} {size} {dtype}"


def _check(got: list[np.ndarray], ref: list[np.ndarray], tolerance: float) -> float:
    """The largest relative error over the outputs, asserted within ``tolerance``."""
    errors = [bench.rel_err(g, r) for g, r in zip(got, ref, strict=True)]
    assert max(errors) <= tolerance, f"relative errors {[f'{e:.1e}' for e in errors]} above {tolerance:g}"
    return max(errors)


def _run_backend(name: str, op: str, size: bench.Size, dtype: str, jobs, backend_named, measure) -> None:
    job = jobs(op, size, dtype)
    with backend_named(name) as backend:
        try:
            arrays = job.convert(backend)
        except TypeError as exc:
            pytest.skip(f"{name} has no {dtype}: {exc}")
        fn = job.run(backend, arrays)
        sync = bench.synchronizer(backend, arrays["u" if "u" in arrays else "x"])
        first = fn()
        sync()
        err = _check(job.outputs(backend, first), job.reference(), job.tolerance)
        del first
        measure(_group(op, size, dtype), fn, sync, rel_err=err, device=bench.describe(backend), updates=size.updates)


# ----------------------------------------------------------------------------- torch baselines


def _torch(wanted, name: str) -> Any:
    """torch, its device (CUDA when available, as the torch backend) and a synchroniser; or a skip."""
    wanted(name)
    torch = pytest.importorskip("torch")
    if name == "baseline-mambapy":
        from baselines import mambapy_available

        reason = mambapy_available()
        if reason is not None:
            pytest.skip(reason)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return torch, device, sync


def _tensors(torch, device, dtype: str, arrays: dict[str, np.ndarray], grad: bool = False) -> dict[str, Any]:
    target = getattr(torch, dtype)
    return {
        k: torch.as_tensor(v, device=device).to(target).requires_grad_(grad and k in SCAN_INPUTS)
        for k, v in arrays.items()
    }


def _numpy(t) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _baseline_scan(name: str, op: str, size, dtype, jobs, wanted, measure) -> None:
    """The baselines on the job's inputs: forward, or forward then backward by autograd."""
    torch, device, sync = _torch(wanted, name)
    from baselines import mambapy_scan, mambapy_scan_inputs, sequential_scan

    job = jobs(op, size, dtype)
    t = _tensors(torch, device, dtype, job.inputs, grad=op == "scan_vjp")
    dout = t.pop("dout", None)
    channel_last = name == "baseline-mambapy"
    if channel_last:
        with torch.no_grad():
            layout = mambapy_scan_inputs(**{k: t[k].detach() for k in SCAN_INPUTS})
        args = {k: (v.requires_grad_(op == "scan_vjp") if v is not None else v) for k, v in layout.items()}
        forward = lambda: mambapy_scan(**args)  # noqa: E731
        leaves = [args[k] for k in ("x", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        dout = None if dout is None else dout.transpose(1, 2).contiguous()
    else:
        forward = lambda: sequential_scan(**{k: t[k] for k in SCAN_INPUTS}, delta_softplus=True)  # noqa: E731
        leaves = [t[k] for k in SCAN_INPUTS]

    def channel_first(x, three_d):
        return x.transpose(1, 2) if channel_last and three_d else x

    if op == "scan":
        def fn():
            with torch.no_grad():
                return [channel_first(forward(), True)]
    else:
        def fn():
            out = forward()
            grads = torch.autograd.grad(out, leaves, dout)
            return [channel_first(out, True), *(channel_first(g, g.ndim == 3) for g in grads)]

    first = fn()
    sync()
    ref = job.reference()
    err = _check([_numpy(x) for x in first], ref[:1] if op == "scan" else ref, job.tolerance)
    del first
    measure(_group(op, size, dtype), fn, sync, rel_err=err, device=str(device), updates=size.updates)


# ----------------------------------------------------------------------------- the suites


@pytest.mark.parametrize("impl", IMPLS)
def test_scan(impl, size, dtype, jobs, wanted, backend_named, measure):
    """Forward scan with softplus, Δ bias, D and the z gate."""
    if impl in BACKENDS:
        _run_backend(impl, "scan", size, dtype, jobs, backend_named, measure)
    else:
        _baseline_scan(impl, "scan", size, dtype, jobs, wanted, measure)


@pytest.mark.parametrize("impl", (*IMPLS, "torch-autograd"))
def test_scan_vjp(impl, size, dtype, jobs, wanted, backend_named, measure):
    """Forward then backward: ``scan_with_vjp`` + its ``vjp`` on backends, autograd on torch and the baselines."""
    if impl in BACKENDS:
        _run_backend(impl, "scan_vjp", size, dtype, jobs, backend_named, measure)
    elif impl == "torch-autograd":
        _torch_autograd(size, dtype, jobs, wanted, backend_named, measure)
    else:
        _baseline_scan(impl, "scan_vjp", size, dtype, jobs, wanted, measure)


def _torch_autograd(size, dtype, jobs, wanted, backend_named, measure):
    wanted("torch-autograd")
    import portassm

    job = jobs("scan_vjp", size, dtype)
    with backend_named("torch") as backend:
        import torch

        arrays = {k: to.requires_grad_(k in SCAN_INPUTS) for k, to in job.convert(backend).items()}
        dout = arrays.pop("dout")
        leaves = [arrays[k] for k in SCAN_INPUTS]
        sync = bench.synchronizer(backend, dout)

        def fn():
            out = portassm.scan(**arrays, delta_softplus=True)
            return [out, *torch.autograd.grad(out, leaves, dout)]

        first = fn()
        sync()
        err = _check([backend.to_numpy(x) for x in first], job.reference(), job.tolerance)
        del first
        measure(_group("scan_vjp", size, dtype), fn, sync, rel_err=err, device=bench.describe(backend),
                updates=size.updates)


@pytest.mark.parametrize("impl", (*BACKENDS, "baseline-torch-loop"))
def test_step(impl, size, dtype, jobs, wanted, backend_named, measure):
    """One decoding token of the scan: (batch, dim, dstate) state in, state and (batch, dim) out."""
    if impl in BACKENDS:
        _run_backend(impl, "step", size, dtype, jobs, backend_named, measure)
        return
    torch, device, sync = _torch(wanted, impl)
    from baselines import sequential_step

    job = jobs("step", size, dtype)
    t = _tensors(torch, device, dtype, job.inputs)

    def fn():
        return sequential_step(**t, dt_softplus=True)

    first = fn()
    sync()
    err = _check([_numpy(x) for x in first], job.reference(), job.tolerance)
    measure(_group("step", size, dtype), fn, sync, rel_err=err, device=str(device))


@pytest.mark.parametrize("impl", IMPLS)
def test_block(impl, size, dtype, jobs, wanted, backend_named, measure):
    """The Mamba block forward, d_model = dim // 2 (inner width dim), 256 tokens."""
    if impl in BACKENDS:
        _run_backend(impl, "block", size, dtype, jobs, backend_named, measure)
        return
    torch, device, sync = _torch(wanted, impl)
    from baselines import mambapy_block, sequential_block

    job = jobs("block", size, dtype)
    t = _tensors(torch, device, dtype, job.inputs)
    params = {k[len("param:"):]: v for k, v in t.items() if k.startswith("param:")}
    module = mambapy_block(params) if impl == "baseline-mambapy" else None

    def fn():
        with torch.no_grad():
            return [module(t["x"]) if module is not None else sequential_block(t["x"], params)]

    first = fn()
    sync()
    err = _check([_numpy(x) for x in first], job.reference(), job.tolerance)
    measure(_group("block", size, dtype), fn, sync, rel_err=err, device=str(device))


@pytest.mark.parametrize("impl", (*BACKENDS, "baseline-mambapy"))
def test_decode(impl, decode_batch, dtype, pytestconfig, wanted, backend_named, measure):
    """One token of a whole language model (random weights of a released size): embedding,
    every block's step, the norms and the tied head over the vocabulary."""
    model_mod = pytest.importorskip("portassm.model", reason="portassm.model is not there yet")
    preset = pytestconfig.getoption("--decode-model")
    config = model_mod.MambaConfig.preset(preset)
    group = f"decode {preset} batch {decode_batch} {dtype}"
    tokens = np.arange(decode_batch) % config.vocab_size
    if impl in BACKENDS:
        with backend_named(impl) as backend:
            try:
                model = model_mod.MambaLM.random(config, seed=0, backend=impl, dtype=dtype)
            except (TypeError, ValueError) as exc:
                pytest.skip(f"{impl}: {exc}")
            cache = model.init_cache(decode_batch)
            sync = bench.synchronizer(backend, model.norm_f)

            def fn():
                return model.step(tokens, cache)

            logits, _ = fn()
            sync()
            assert np.all(np.isfinite(backend.to_numpy(logits)))
            measure(group, fn, sync, device=bench.describe(backend), tokens_per_call=decode_batch)
        return
    torch, device, sync = _torch(wanted, impl)
    from baselines import mambapy_decoder

    lm = mambapy_decoder(config.d_model, config.n_layer, config.vocab_size, config.d_state, config.expand,
                         config.d_conv).to(device=device, dtype=getattr(torch, dtype)).eval()
    ids = torch.as_tensor(tokens, device=device)
    d_inner = config.d_model * config.expand

    # mambapy's step replaces the list's entries by the new states: each call steps one token further
    cache = [(torch.zeros(decode_batch, d_inner, config.d_state, device=device),
              torch.zeros(decode_batch, d_inner, config.d_conv - 1, device=device, dtype=getattr(torch, dtype)))
             for _ in range(config.n_layer)]

    def fn():
        with torch.no_grad():
            return lm.step(ids, cache)

    logits, _ = fn()
    sync()
    assert torch.isfinite(logits).all()
    measure(group, fn, sync, device=str(device), tokens_per_call=decode_batch)
