"""The cross-backend suite: every backend against the float64 NumPy oracle.

Each test runs once per backend (the ``backend`` fixture); inputs are fresh random NumPy
arrays moved to the backend's arrays, results moved back and compared by
‖got − ref‖/‖ref‖ within DESIGN.md's tolerances.
"""

from __future__ import annotations

import numpy as np
import pytest

import portassm

from .helpers import TOLERANCE, make_case, oracle_forward, oracle_grads, rel_err

FORMS = ("selective", "grouped", "invariant")
METHODS = ("mamba", "zoh", "bilinear")
DTYPES = ("float64", "float32")


def run_scan(backend, case, **kwargs):
    out = portassm.scan(**case.kwargs(backend.asarray), **kwargs)
    if isinstance(out, tuple):
        return tuple(backend.to_numpy(o) for o in out)
    return backend.to_numpy(out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("options", [True, False], ids=["all-options", "bare"])
def test_forward(backend, rng, dtype, form, method, options):
    case = make_case(rng, form=form, discretization=method, options=options, softplus=options).astype(dtype)
    out, last = run_scan(backend, case, return_last_state=True)
    ref_out, ref_last = oracle_forward(case)
    assert out.dtype == np.dtype(dtype)
    assert last.dtype == np.dtype(dtype)  # float32 state for float32 inputs, float64 for float64
    assert rel_err(out, ref_out) <= TOLERANCE[dtype]
    assert rel_err(last, ref_last) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", METHODS)
def test_vjp(backend, rng, dtype, form, method):
    case = make_case(rng, form=form, discretization=method).astype(dtype)
    dout = rng.standard_normal(case.u.shape).astype(dtype)
    dlast = rng.standard_normal(case.initial_state.shape).astype(dtype)
    grads = portassm.scan_vjp(
        backend.asarray(dout), **case.kwargs(backend.asarray), dlast_state=backend.asarray(dlast)
    )
    refs = oracle_grads(case, dout, dlast)
    for name, got, ref in zip(case.ARRAYS, grads, refs):
        got = backend.to_numpy(got)
        assert got.dtype == getattr(case, name).dtype, name
        assert rel_err(got, ref) <= TOLERANCE[dtype], f"d{name}: {rel_err(got, ref):.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
def test_scan_with_vjp_equals_scan_then_scan_vjp(backend, rng, dtype, form):
    # 150 steps: several of the numba backend's chunks of 64, whose checkpoints it keeps
    case = make_case(rng, seqlen=150, form=form).astype(dtype)
    dout = rng.standard_normal(case.u.shape).astype(dtype)
    dlast = rng.standard_normal(case.initial_state.shape).astype(dtype)
    kwargs = case.kwargs(backend.asarray)
    out, last, vjp = portassm.scan_with_vjp(**kwargs, return_last_state=True)
    ref_out, ref_last = run_scan(backend, case, return_last_state=True)
    np.testing.assert_array_equal(backend.to_numpy(out), ref_out)
    np.testing.assert_array_equal(backend.to_numpy(last), ref_last)
    for cotangent in (dlast, None):  # vjp can be called again, with other cotangents
        with_last = {} if cotangent is None else {"dlast_state": backend.asarray(cotangent)}
        grads = vjp(backend.asarray(dout), **with_last)
        refs = portassm.scan_vjp(backend.asarray(dout), **kwargs, **with_last)
        oracle = oracle_grads(case, dout, cotangent)
        for name, got, ref, exact in zip(case.ARRAYS, grads, refs, oracle):
            got = backend.to_numpy(got)
            assert got.dtype == getattr(case, name).dtype, name
            assert rel_err(got, backend.to_numpy(ref)) <= TOLERANCE[dtype], name
            assert rel_err(got, exact) <= TOLERANCE[dtype], f"d{name}: {rel_err(got, exact):.2e}"
    out_only, vjp_only = portassm.scan_with_vjp(**kwargs)
    np.testing.assert_array_equal(backend.to_numpy(out_only), ref_out)


def test_scan_with_vjp_of_an_empty_sequence(backend, rng):
    case = make_case(rng, seqlen=0)
    out, last, vjp = portassm.scan_with_vjp(**case.kwargs(backend.asarray), return_last_state=True)
    assert backend.to_numpy(out).shape == case.u.shape
    np.testing.assert_array_equal(backend.to_numpy(last), case.initial_state)
    grads = vjp(backend.asarray(np.zeros(case.u.shape)))
    assert backend.to_numpy(grads.dA).shape == case.A.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("method", METHODS)
def test_step_matches_scan(backend, rng, dtype, groups, method):
    case = make_case(rng, form="grouped", groups=groups, discretization=method).astype(dtype)
    ref_out, ref_last = oracle_forward(case)
    to = backend.asarray
    state = to(case.initial_state.astype(np.float64 if dtype == "float64" else np.float32))
    for t in range(case.u.shape[2]):
        y, state = portassm.scan_step(
            state, to(case.u[..., t]), to(case.delta[..., t]), to(case.A), to(case.B[..., t]), to(case.C[..., t]),
            to(case.D), to(case.z[..., t]), to(case.delta_bias), True, discretization=method,
        )
        assert rel_err(backend.to_numpy(y), ref_out[..., t]) <= TOLERANCE[dtype]
    assert rel_err(backend.to_numpy(state), ref_last) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, seqlen, dstate",
    [(1, 1, 16), (1, 7, 3), (1, 1000, 1), (2, 33, 64), (3, 130, 16)],
)
def test_odd_sizes(backend, rng, dtype, batch, seqlen, dstate):
    case = make_case(rng, batch=batch, dim=5, seqlen=seqlen, dstate=dstate).astype(dtype)
    out, last = run_scan(backend, case, return_last_state=True)
    ref_out, ref_last = oracle_forward(case)
    assert rel_err(out, ref_out) <= TOLERANCE[dtype]
    assert rel_err(last, ref_last) <= TOLERANCE[dtype]


def test_non_contiguous_inputs(backend, rng):
    base = make_case(rng, batch=2, dim=6, seqlen=40, dstate=4)
    strided = make_case(rng, batch=2, dim=6, seqlen=40, dstate=4)
    # every array a view with gaps or a transposed layout
    for name in ("u", "delta", "z"):
        wide = np.zeros((2, 6, 80))
        wide[..., ::2] = getattr(base, name)
        setattr(strided, name, wide[..., ::2])
    for name in ("B", "C"):
        setattr(strided, name, np.ascontiguousarray(getattr(base, name).transpose(2, 1, 0)).transpose(2, 1, 0))
    strided.A = np.asfortranarray(base.A)
    for name in ("D", "delta_bias", "initial_state"):
        setattr(strided, name, getattr(base, name))
    assert not strided.u.flags.c_contiguous and not strided.B.flags.c_contiguous
    out = run_scan(backend, strided)
    assert rel_err(out, oracle_forward(base)[0]) <= TOLERANCE["float64"]


def test_empty_sequence(backend, rng):
    case = make_case(rng, seqlen=0)
    out, last = run_scan(backend, case, return_last_state=True)
    assert out.shape == case.u.shape
    np.testing.assert_array_equal(last, case.initial_state)
    grads = portassm.scan_vjp(backend.asarray(np.zeros(case.u.shape)), **case.kwargs(backend.asarray))
    assert backend.to_numpy(grads.dA).shape == case.A.shape


def test_nan_propagates(backend, rng):
    case = make_case(rng, batch=1, dim=3, seqlen=6, options=False, softplus=False)
    case.u[0, 1, 2] = np.nan
    out = run_scan(backend, case)
    assert np.isnan(out[0, 1, 2:]).all(), "NaN must reach every later output of its channel"
    assert np.isfinite(out[0, 0]).all() and np.isfinite(out[0, 2]).all() and np.isfinite(out[0, 1, :2]).all()


@pytest.mark.parametrize("method", METHODS)
def test_discretize(backend, rng, method):
    case = make_case(rng, form="grouped", softplus=False)
    abar, bbar = portassm.discretize(backend.asarray(case.delta), backend.asarray(case.A), backend.asarray(case.B), method)
    with portassm.use_backend("numpy"):
        ref_a, ref_b = portassm.discretize(case.delta, case.A, case.B, method)
    assert rel_err(backend.to_numpy(abar), ref_a) <= 1e-13
    assert rel_err(backend.to_numpy(bbar), ref_b) <= 1e-13


def naive_conv(x, weight, bias, silu, state):
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    padded = np.concatenate([state, x], axis=-1)
    out = np.zeros_like(x)
    for t in range(seqlen):
        out[..., t] = (padded[..., t : t + width] * weight).sum(-1) + bias
    return out * (1 / (1 + np.exp(-out))) if silu else out


@pytest.mark.parametrize("width", [1, 4])
def test_causal_conv1d_and_its_step(backend, rng, width):
    x = rng.standard_normal((2, 5, 11))
    weight, bias = rng.standard_normal((5, width)), rng.standard_normal(5)
    state = rng.standard_normal((2, 5, width - 1))
    to = backend.asarray
    out, final = portassm.causal_conv1d(to(x), to(weight), to(bias), "silu", initial_state=to(state), return_final_state=True)
    assert rel_err(backend.to_numpy(out), naive_conv(x, weight, bias, True, state)) <= 1e-13
    steps = []
    conv_state = to(state)
    for t in range(x.shape[2]):
        y, conv_state = portassm.causal_conv1d_step(to(x[..., t]), conv_state, to(weight), to(bias), "silu")
        steps.append(backend.to_numpy(y))
    assert rel_err(np.stack(steps, -1), naive_conv(x, weight, bias, True, state)) <= 1e-13
    np.testing.assert_array_equal(backend.to_numpy(conv_state), backend.to_numpy(final))


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_step_by_step_equals_full_forward(backend, rng, dtype):
    params = portassm.init_block_params(24, d_state=8, seed=int(rng.integers(1 << 30)), dtype=dtype)
    x = backend.asarray(rng.standard_normal((2, 13, 24)).astype(dtype))
    full, (conv_state, ssm_state) = portassm.mamba_block(x, params, return_cache=True)
    # the first 8 tokens in one call, then step by step from its cache
    xn = backend.to_numpy(x)
    out8, cache = portassm.mamba_block(backend.asarray(xn[:, :8]), params, return_cache=True)
    outs = [backend.to_numpy(out8)]
    for t in range(8, 13):
        y, cache = portassm.mamba_block_step(backend.asarray(xn[:, t]), params, cache)
        outs.append(backend.to_numpy(y)[:, None])
    assert rel_err(np.concatenate(outs, axis=1), backend.to_numpy(full)) <= TOLERANCE[dtype]
    assert rel_err(backend.to_numpy(cache[1]), backend.to_numpy(ssm_state)) <= TOLERANCE[dtype]


def test_block_agrees_with_reference(backend, rng):
    seed = int(rng.integers(1 << 30))
    x = rng.standard_normal((2, 17, 32))
    with portassm.use_backend("numpy"):
        ref = portassm.mamba_block(x, portassm.init_block_params(32, seed=seed, dtype="float64"))
    params = portassm.init_block_params(32, seed=seed, dtype="float64")
    out = backend.to_numpy(portassm.mamba_block(backend.asarray(x), params))
    assert rel_err(out, ref) <= 1e-12
