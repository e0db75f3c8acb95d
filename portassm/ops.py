"""The public operations: validate once (``checks``), then dispatch to the backend in force.

Shapes follow mamba_ssm's channel-first layout; see ``docs/math.md`` for the maths and
:mod:`portassm.backends` for what the kernels receive.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat

from . import checks
from . import discretization as disc
from .backend import get_backend

Array = Any


class ScanGrads(NamedTuple):
    """Gradients of :func:`scan` with respect to each array argument (None for those not given)."""

    du: Array
    ddelta: Array
    dA: Array
    dB: Array
    dC: Array
    dD: Array | None
    dz: Array | None
    ddelta_bias: Array | None
    dinitial_state: Array | None


def _compute_dtype(xp: Any, *arrays: Array | None) -> Any:
    wide = any(a is not None and checks.dtype_name(a) == "float64" for a in arrays)
    return xp.float64 if wide else xp.float32


def _scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, discretization, **extra):
    backend = get_backend()
    arrays = checks.to_backend(
        backend, u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
        initial_state=initial_state, **extra,
    )
    extra_out = {name: arrays.pop(name) for name in extra}
    args = checks.scan_args(**arrays, discretization=discretization)
    return backend, args, extra_out


def scan(
    u: Array,
    delta: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Array | None = None,
    z: Array | None = None,
    delta_bias: Array | None = None,
    delta_softplus: bool = False,
    *,
    initial_state: Array | None = None,
    return_last_state: bool = False,
    discretization: str = "mamba",
) -> Array | tuple[Array, Array]:
    """The selective scan (Mamba's S6 layer), a drop-in for mamba_ssm's ``selective_scan_fn``.

    For every batch b, channel d, time t and state n, with
    Δ = softplus(delta + delta_bias) (softplus only when ``delta_softplus``)::

        h[t] = Abar(Δ[t], A) * h[t-1] + Bcoef(Δ[t], A) * B[t] * u[t]
        y[t] = sum_n C[t] * h[t] + D * u[t];   out = y * silu(z)

    Parameters
    ----------
    u, delta : array, (batch, dim, seqlen)
    A : array, (dim, dstate)
        The diagonal of the state matrix (negative for a stable system).
    B, C : array
        (batch, dstate, seqlen), selective; (batch, groups, dstate, seqlen) with
        ``dim % groups == 0``, channel d using group ``d // (dim // groups)``; or
        (dim, dstate), time-invariant.
    D, delta_bias : array, (dim,), optional
    z : array, (batch, dim, seqlen), optional
        Gate: the output is multiplied by ``z * sigmoid(z)``.
    delta_softplus : bool
        Apply softplus (threshold 20) to ``delta + delta_bias``.
    initial_state : array, (batch, dim, dstate), optional
        The state before the first token; zeros when absent.
    return_last_state : bool
        Also return the state after the last token.
    discretization : {"mamba", "zoh", "bilinear"}

    Returns
    -------
    out : array, (batch, dim, seqlen), u's dtype
    last_state : array, (batch, dim, dstate)
        float32, or float64 when an input is float64. Only with ``return_last_state``.
    """
    backend, a, _ = _scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, discretization)
    out, last, _ = _forward(backend, a, delta_softplus, discretization, keep_checkpoints=False)
    return (out, last) if return_last_state else out


def _forward(backend: Any, a: checks.ScanArgs, delta_softplus, discretization: str, keep_checkpoints: bool) -> tuple:
    """``(out, last_state, residuals)`` of the validated arguments ``a``.

    ``residuals`` are the backend's checkpoints for ``scan_bwd`` when ``keep_checkpoints``
    and the backend keeps them (``SUPPORTS_RESIDUALS``), else None.
    """
    if a.seqlen == 0:
        return a.u, _empty_scan_state(backend, a), None
    args = (a.u, a.delta, a.A, a.B, a.C, a.D, a.z, a.delta_bias, bool(delta_softplus), a.initial_state, discretization)
    if keep_checkpoints and getattr(backend.module, "SUPPORTS_RESIDUALS", False):
        return backend.scan_fwd(*args, save_checkpoints=True)
    return (*backend.scan_fwd(*args), None)


def _empty_scan_state(backend: Any, a: checks.ScanArgs) -> Array:
    xp = backend.namespace()
    dtype = _compute_dtype(xp, a.u, a.delta, a.A, a.B, a.C, a.D, a.z, a.delta_bias, a.initial_state)
    if a.initial_state is not None:
        return xp.astype(a.initial_state, dtype)
    return xp.zeros((a.batch, a.dim, a.dstate), dtype=dtype, device=array_api_compat.device(a.u))


def scan_vjp(
    dout: Array,
    u: Array,
    delta: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Array | None = None,
    z: Array | None = None,
    delta_bias: Array | None = None,
    delta_softplus: bool = False,
    *,
    initial_state: Array | None = None,
    dlast_state: Array | None = None,
    discretization: str = "mamba",
) -> ScanGrads:
    """Gradients of :func:`scan` for the cotangent ``dout`` (and ``dlast_state`` of the last state).

    Takes :func:`scan`'s arguments, plus ``dout`` (batch, dim, seqlen) and optionally
    ``dlast_state`` (batch, dim, dstate). Each gradient has its argument's shape and dtype.
    """
    backend, a, extra = _scan_inputs(
        u, delta, A, B, C, D, z, delta_bias, initial_state, discretization, dout=dout, dlast_state=dlast_state
    )
    return _scan_grads(backend, a, extra["dout"], extra["dlast_state"], delta_softplus, discretization, None)


def _scan_grads(backend, a, dout, dlast_state, delta_softplus, discretization, residuals) -> ScanGrads:
    """Check the cotangents against the validated arguments ``a``, run the backward kernel, map dB and dC back."""
    checks.check_ndim("dout", dout, {3: "(batch, dim, seqlen)"})
    for axis, what in enumerate(("batch", "dim", "seqlen")):
        checks.check_size("dout", dout, axis, what, "u", a.u.shape[axis])
    if dlast_state is not None:
        checks.check_state("dlast_state", dlast_state, a.batch, a.dim, a.dstate)
    if a.seqlen == 0:
        grads = _empty_scan_grads(backend, a, dlast_state)
    else:
        saved = {} if residuals is None else {"residuals": residuals}
        grads = backend.scan_bwd(
            dout, dlast_state, a.u, a.delta, a.A, a.B, a.C, a.D, a.z, a.delta_bias, bool(delta_softplus),
            a.initial_state, discretization, **saved,
        )
    grads = list(grads)
    if a.B_was_3d:
        grads[3] = grads[3][:, 0]
    if a.C_was_3d:
        grads[4] = grads[4][:, 0]
    return ScanGrads(*grads)


def scan_with_vjp(
    u: Array,
    delta: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Array | None = None,
    z: Array | None = None,
    delta_bias: Array | None = None,
    delta_softplus: bool = False,
    *,
    initial_state: Array | None = None,
    return_last_state: bool = False,
    discretization: str = "mamba",
) -> tuple:
    """:func:`scan`, plus a function that gives its gradients (as ``jax.vjp``).

    Takes :func:`scan`'s arguments and returns ``(out, vjp)``, or ``(out, last_state,
    vjp)`` with ``return_last_state``. ``vjp(dout, dlast_state=None)`` returns the
    :class:`ScanGrads` that ``scan_vjp(dout, <the same arguments>, dlast_state=...)``
    returns. It can be called any number of times, with different cotangents.

    The difference with ``scan`` then ``scan_vjp`` is the work: on backends that support
    it (numba, cupy) the forward keeps the states at chunk boundaries (numba: one state
    per channel every 64 steps, O(batch·dim·dstate·seqlen/64) memory), and the backward
    starts from them instead of running the recurrence over the sequence once more.
    Other backends recompute as ``scan_vjp`` does. ``vjp`` holds on to the arguments
    and runs on the backend that was in force when ``scan_with_vjp`` was called.
    """
    backend, a, _ = _scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, discretization)
    out, last, residuals = _forward(backend, a, delta_softplus, discretization, keep_checkpoints=True)

    def vjp(dout: Array, dlast_state: Array | None = None) -> ScanGrads:
        extra = checks.to_backend(backend, dout=dout, dlast_state=dlast_state)
        return _scan_grads(
            backend, a, extra["dout"], extra["dlast_state"], delta_softplus, discretization, residuals
        )

    return (out, last, vjp) if return_last_state else (out, vjp)


def _empty_scan_grads(backend: Any, a: checks.ScanArgs, dlast_state: Array | None) -> tuple:
    xp = backend.namespace()
    zeros = lambda x: None if x is None else xp.zeros_like(x)  # noqa: E731
    dinit = None
    if a.initial_state is not None:
        dinit = zeros(a.initial_state) if dlast_state is None else xp.astype(dlast_state, a.initial_state.dtype)
    return (*(zeros(x) for x in (a.u, a.delta, a.A, a.B, a.C, a.D, a.z, a.delta_bias)), dinit)


def scan_step(
    state: Array,
    x: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Array | None = None,
    z: Array | None = None,
    dt_bias: Array | None = None,
    dt_softplus: bool = False,
    *,
    discretization: str = "mamba",
) -> tuple[Array, Array]:
    """Advance the scan by one token (decoding).

    Parameters
    ----------
    state : array, (batch, dim, dstate)
        Not modified.
    x, dt : array, (batch, dim)
    A : array, (dim, dstate)
    B, C : array, (batch, dstate) or (batch, groups, dstate)
        A time-invariant (dim, dstate) B steps as ``B[None]`` broadcast to (batch, dim, dstate).
    D, dt_bias : array, (dim,), optional
    z : array, (batch, dim), optional
    dt_softplus : bool
    discretization : {"mamba", "zoh", "bilinear"}

    Returns
    -------
    y : array, (batch, dim), x's dtype
    new_state : array, (batch, dim, dstate), state's dtype
    """
    backend = get_backend()
    fast = checks.native_step_args(backend, state, x, dt, A, B, C, D, z, dt_bias, discretization)
    if fast is not None:  # decoding's usual case: nothing to convert, shapes as expected
        return backend.scan_step(state, x, dt, A, fast[0], fast[1], D, z, dt_bias, bool(dt_softplus), discretization)
    a = checks.to_backend(backend, state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    B_, C_ = checks.step_args(
        a["state"], a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"], a["dt_bias"], discretization
    )
    return backend.scan_step(
        a["state"], a["x"], a["dt"], a["A"], B_, C_, a["D"], a["z"], a["dt_bias"], bool(dt_softplus), discretization
    )


def discretize(delta: Array, A: Array, B: Array, method: str = "mamba") -> tuple[Array, Array]:
    """The materialised discretised system ``(Abar, Bbar)``, each (batch, dim, seqlen, dstate).

    For study and for the time-invariant case: the fused :func:`scan` never builds these.

    Parameters
    ----------
    delta : array, (batch, dim, seqlen)
        The step sizes Δ, already positive (no bias or softplus is applied).
    A : array, (dim, dstate)
    B : array, (batch, dstate, seqlen), (batch, groups, dstate, seqlen) or (dim, dstate)
    method : {"mamba", "zoh", "bilinear"}
    """
    backend = get_backend()
    arrays = checks.to_backend(backend, delta=delta, A=A, B=B)
    delta, A, B = arrays["delta"], arrays["A"], arrays["B"]
    a = checks.scan_args(delta, delta, A, B, B, None, None, None, None, method)
    xp = backend.namespace()
    if B.ndim == 2:
        per_channel = B[None, :, None, :]  # (1, dim, 1, dstate)
    else:
        groups = a.B.shape[1]
        index = xp.asarray([d // (a.dim // groups) for d in range(a.dim)], device=array_api_compat.device(B))
        per_channel = xp.permute_dims(xp.take(a.B, index, axis=1), (0, 1, 3, 2))  # (batch, dim, seqlen, dstate)
    abar, bcoef = disc.coefficients(xp, delta[..., None], A[:, None, :], method)
    return abar, bcoef * per_channel


def causal_conv1d(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    activation: str | None = None,
    *,
    initial_state: Array | None = None,
    return_final_state: bool = False,
) -> Array | tuple[Array, Array]:
    """Depthwise causal convolution along time, with an optional bias and SiLU.

    ``out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (width - 1) + k])``,
    inputs before t = 0 taken from ``initial_state`` (zeros when absent).

    Parameters
    ----------
    x : array, (batch, dim, seqlen)
    weight : array, (dim, width)
    bias : array, (dim,), optional
    activation : None or "silu"
    initial_state : array, (batch, dim, width - 1), optional
        The inputs that precede ``x``, oldest first.
    return_final_state : bool
        Also return the last ``width - 1`` inputs, the state of :func:`causal_conv1d_step`.
    """
    backend = get_backend()
    a = checks.to_backend(backend, x=x, weight=weight, bias=bias, initial_state=initial_state)
    x, weight, bias, initial_state = a["x"], a["weight"], a["bias"], a["initial_state"]
    checks.check_ndim("x", x, {3: "(batch, dim, seqlen)"})
    checks.conv_args(x, weight, bias, activation, initial_state, "initial_state")
    kernel = getattr(backend.module, "causal_conv1d", None)
    if kernel is not None:
        out, final = kernel(x, weight, bias, activation, initial_state)
    else:
        out, final = _causal_conv1d_array_api(backend.namespace(), x, weight, bias, activation, initial_state)
    return (out, final) if return_final_state else out


def _silu(xp: Any, y: Array) -> Array:
    return y / (1 + xp.exp(-y))


def _causal_conv1d_array_api(xp, x, weight, bias, activation, initial_state):
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    if initial_state is None:
        initial_state = xp.zeros((batch, dim, width - 1), dtype=x.dtype, device=array_api_compat.device(x))
    padded = xp.concat([xp.astype(initial_state, x.dtype), x], axis=-1)
    out = weight[:, 0:1] * padded[..., 0:seqlen]
    for k in range(1, width):
        out = out + weight[:, k : k + 1] * padded[..., k : k + seqlen]
    if bias is not None:
        out = out + bias[:, None]
    if activation is not None:
        out = _silu(xp, out)
    return out, padded[..., padded.shape[-1] - (width - 1) :]


def causal_conv1d_step(
    x: Array,
    conv_state: Array,
    weight: Array,
    bias: Array | None = None,
    activation: str | None = None,
) -> tuple[Array, Array]:
    """One token of :func:`causal_conv1d`.

    Parameters
    ----------
    x : array, (batch, dim)
    conv_state : array, (batch, dim, width - 1)
        The preceding inputs, oldest first. Not modified.
    weight : array, (dim, width)
    bias : array, (dim,), optional
    activation : None or "silu"

    Returns
    -------
    out : array, (batch, dim)
    new_state : array, (batch, dim, width - 1)
    """
    backend = get_backend()
    a = checks.to_backend(backend, x=x, conv_state=conv_state, weight=weight, bias=bias)
    x, conv_state, weight, bias = a["x"], a["conv_state"], a["weight"], a["bias"]
    checks.check_ndim("x", x, {2: "(batch, dim)"})
    checks.conv_args(x, weight, bias, activation, conv_state, "conv_state")
    kernel = getattr(backend.module, "causal_conv1d_step", None)
    if kernel is not None:
        return kernel(x, conv_state, weight, bias, activation)
    xp = backend.namespace()
    window = xp.concat([xp.astype(conv_state, x.dtype), x[:, :, None]], axis=-1)
    out = xp.sum(window * weight, axis=-1)
    if bias is not None:
        out = out + bias
    if activation is not None:
        out = _silu(xp, out)
    return out, window[..., 1:]
