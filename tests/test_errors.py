"""Bad input fails the same way on every backend, before any kernel runs."""

from __future__ import annotations

import numpy as np
import pytest

import portassm
from portassm import ShapeError

from .helpers import make_case


def bad_cases(rng):
    """(what is changed, the keyword arguments, the exception, a part of its message)."""
    good = make_case(rng, batch=2, dim=6, seqlen=8, dstate=4).kwargs()

    def with_(**changes):
        return {**good, **changes}

    return [
        ("u 2-D", with_(u=good["u"][0]), ShapeError, "u must be 3-dimensional (batch, dim, seqlen), got shape (6, 8)"),
        ("delta seqlen", with_(delta=good["delta"][..., :5]), ShapeError, "delta has seqlen 5 but u has seqlen 8"),
        ("B seqlen", with_(B=rng.standard_normal((2, 4, 7))), ShapeError, "B has seqlen 7 but u has seqlen 8"),
        ("B batch", with_(B=rng.standard_normal((3, 4, 8))), ShapeError, "B has batch 3 but u has batch 2"),
        ("C dstate", with_(C=rng.standard_normal((2, 5, 8))), ShapeError, "C has dstate 5 but A has dstate 4"),
        ("A dim", with_(A=-np.ones((5, 4))), ShapeError, "A has dim 5 but u has dim 6"),
        ("B 5-D", with_(B=rng.standard_normal((2, 1, 1, 4, 8))), ShapeError, "B must be 2-dimensional"),
        ("groups", with_(B=rng.standard_normal((2, 4, 4, 8))), ShapeError, "B has 4 groups, which does not divide dim 6"),
        ("invariant dim", with_(B=rng.standard_normal((5, 4))), ShapeError, "B has dim 5 but u has dim 6"),
        ("D dim", with_(D=np.ones(5)), ShapeError, "D has dim 5 but u has dim 6"),
        ("z shape", with_(z=good["z"][:1]), ShapeError, "z has batch 1 but u has batch 2"),
        ("state dstate", with_(initial_state=np.zeros((2, 6, 3))), ShapeError, "initial_state has dstate 3 but A has dstate 4"),
        ("integer u", with_(u=np.ones((2, 6, 8), dtype=np.int64)), TypeError, "u must be a real floating array"),
        ("complex A", with_(A=good["A"].astype(np.complex128)), TypeError, "A must be a real floating array"),
        ("not an array", with_(D=[1.0] * 6), TypeError, "D must be an array, got list"),
        ("method", with_(discretization="euler"), ValueError, "discretization must be one of mamba, zoh, bilinear, got 'euler'"),
        ("u missing", with_(u=None), TypeError, "u is required: pass an array of shape (batch, dim, seqlen), got None"),
        ("C missing", with_(C=None), TypeError, "C is required"),
    ]


def test_bad_scan_inputs(backend, rng):
    for what, kwargs, error, message in bad_cases(rng):
        converted = {k: backend.asarray(v) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v for k, v in kwargs.items()}
        with pytest.raises(error) as info:
            portassm.scan(**converted)
        assert message in str(info.value), f"{what}: {info.value}"


def test_bad_step_inputs(backend, rng):
    to = backend.asarray
    state, x = to(rng.standard_normal((2, 6, 4))), to(rng.standard_normal((2, 6)))
    A, B = to(-np.ones((6, 4))), to(rng.standard_normal((2, 4)))
    with pytest.raises(ShapeError, match="dt has dim 5 but x has dim 6"):
        portassm.scan_step(state, x, to(np.ones((2, 5))), A, B, B)
    with pytest.raises(ShapeError, match="C has dstate 3 but A has dstate 4"):
        portassm.scan_step(state, x, x, A, B, to(rng.standard_normal((2, 3))))
    with pytest.raises(ShapeError, match="state has batch 1 but x has batch 2"):
        portassm.scan_step(state[:1], x, x, A, B, B)
    with pytest.raises(ValueError, match="discretization must be one of"):
        portassm.scan_step(state, x, x, A, B, B, discretization="rk4")
    # after a good call (the decoding fast path is warm), bad input still fails the same way
    portassm.scan_step(state, x, x, A, B, B, to(np.ones(6)), x, to(np.ones(6)))
    with pytest.raises(TypeError, match="dt must be a real floating array"):
        portassm.scan_step(state, x, to(np.ones((2, 6), dtype=np.int64)), A, B, B)
    with pytest.raises(ShapeError, match="D has dim 5 but x has dim 6"):
        portassm.scan_step(state, x, x, A, B, B, to(np.ones(5)))
    with pytest.raises(ShapeError, match="x must be 2-dimensional"):
        portassm.scan_step(state, x[0], x[0], A, B, B)
    args = [state, x, x, A, B, B]
    for i, name in enumerate(("state", "x", "dt", "A", "B", "C")):
        with pytest.raises(TypeError, match=rf"{name} is required: pass an array of shape .*, got None"):
            portassm.scan_step(*args[:i], None, *args[i + 1:])


def test_step_fast_path_takes_only_the_usual_case(backend, rng):
    """``checks.native_step_args``: B and C as (batch, 1, dstate) views when every array is the
    backend's own floating array of the usual shapes; None (the full checks then run) for
    anything else: a foreign or integer array, any shape off, an unknown method."""
    from portassm import checks

    to = backend.asarray
    a = {
        "state": to(rng.standard_normal((2, 6, 4))), "x": to(rng.standard_normal((2, 6))),
        "dt": to(rng.standard_normal((2, 6))), "A": to(-np.ones((6, 4))), "B": to(rng.standard_normal((2, 4))),
        "C": to(rng.standard_normal((2, 4))), "D": to(np.ones(6)), "z": to(rng.standard_normal((2, 6))),
        "dt_bias": to(np.ones(6)),
    }
    fast = lambda **kw: checks.native_step_args(backend, **{**a, "discretization": "mamba", **kw})
    for _ in range(2):  # the second time from the cache of native float types
        B3, C3 = fast()
        assert tuple(B3.shape) == tuple(C3.shape) == (2, 1, 4)
        assert np.array_equal(backend.to_numpy(B3)[:, 0], backend.to_numpy(a["B"]))
    assert fast(D=None, z=None, dt_bias=None) is not None
    assert fast(discretization="rk4") is None
    assert fast(dt=to(np.ones((2, 6), dtype=np.int64))) is None
    if not backend.is_native(np.ones(1)):
        assert fast(x=np.ones((2, 6))) is None  # a NumPy array given to a device backend: converted
    off = {
        "state": (2, 6, 3), "x": (3, 6), "dt": (2, 5), "A": (5, 4), "B": (2, 3), "C": (1, 4), "D": (5,),
        "z": (2, 5), "dt_bias": (7,),
    }
    for name, shape in off.items():
        assert fast(**{name: to(np.ones(shape))}) is None, name
    assert fast(B=to(np.ones((2, 1, 4)))) is None  # grouped B: the full checks take it
    assert fast(x=to(np.ones((2, 6, 1)))) is None


def test_bad_vjp_and_conv_inputs(backend, rng):
    case = make_case(rng)
    kw = case.kwargs(backend.asarray)
    with pytest.raises(ShapeError, match="dout has seqlen 3 but u has seqlen 9"):
        portassm.scan_vjp(backend.asarray(np.ones((2, 6, 3))), **kw)
    with pytest.raises(ShapeError, match="dlast_state has dim 5 but u has dim 6"):
        portassm.scan_vjp(backend.asarray(np.ones((2, 6, 9))), **kw, dlast_state=backend.asarray(np.ones((2, 5, 4))))
    x, w = backend.asarray(np.ones((2, 6, 9))), backend.asarray(np.ones((6, 4)))
    with pytest.raises(ShapeError, match="initial_state holds 4 past inputs but weight of width 4 needs 3"):
        portassm.causal_conv1d(x, w, initial_state=backend.asarray(np.ones((2, 6, 4))))
    with pytest.raises(ValueError, match="activation must be None or 'silu'"):
        portassm.causal_conv1d(x, w, activation="relu")


class _OtherLibraryArray:
    """Stands for an array of a second non-NumPy library."""

    __module__ = "otherlib.core"
    shape, dtype, ndim = (2, 6, 9), np.dtype("float32"), 3


class _GpuArray(_OtherLibraryArray):
    __module__ = "cupy._core"

    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA


def test_mixed_array_libraries_are_refused(rng):
    case = make_case(rng)
    kw = case.kwargs()
    kw["u"], kw["z"] = _OtherLibraryArray(), _GpuArray()
    with portassm.use_backend("numpy"), pytest.raises(TypeError, match="arrays of more than one library: u is a otherlib array, z is a cupy array"):
        portassm.scan(**kw)


def test_gpu_array_on_cpu_backend_says_how_to_move_it(rng):
    kw = make_case(rng).kwargs()
    kw["u"] = _GpuArray()
    with portassm.use_backend("numpy"), pytest.raises(TypeError, match=r"u: got a cupy array on a GPU.*x.get\(\)"):
        portassm.scan(**kw)


def test_unknown_and_unavailable_backends(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'jaxx'; known backends: auto, numpy, numba, torch, cupy"):
        portassm.set_backend("jaxx")
    from portassm import backend as selection
    from portassm.backends import BACKENDS

    monkeypatch.setitem(BACKENDS, "missing", ("portassm_no_such_module", "pip install 'portassm[missing]'"))
    with pytest.raises(portassm.BackendUnavailableError, match=r"unavailable.*Install it with: pip install 'portassm\[missing\]'") as info:
        portassm.set_backend("missing")
    assert isinstance(info.value, ImportError)
    assert "portassm_no_such_module" in portassm.available_backends()["missing"]
    selection._reasons.pop("missing", None)
