"""The backend table and the contract every backend module meets.

What this layer guarantees:

* A backend module is imported only when that backend is chosen (or when
  :func:`portassm.available_backends` is asked), so ``import portassm`` pulls in
  numpy and array_api_compat alone.
* A broken or missing install of one library never breaks the others: an import
  error becomes the backend's "reason", shown by ``python -m portassm info``.
* Backends hold kernels only. Validation (``portassm.checks``) and everything that is
  not a hot loop (``portassm.ops``, ``portassm.block``) is written once.

The contract
------------
A backend module defines:

``NAME``
    Its name in :data:`BACKENDS`.
``probe() -> str | None``
    None when usable here, otherwise the reason (a missing CUDA device, say).
    Import errors of the module itself are caught by the loader.
``configure(**options) -> None``
    Backend options given to ``set_backend(name, **options)``; an unknown option is a
    TypeError naming the known ones.
``namespace()``
    The array-API namespace of its arrays (through array_api_compat).
``asarray(x)``, ``to_numpy(x)``
    Move an array of another library in (NumPy inputs are always accepted), and out
    to NumPy. ``asarray`` refuses a GPU array on a CPU backend with a message that
    says how to move it.
``is_native(x) -> bool``
    Whether ``x`` is already one of its own arrays.

and the kernels, which receive arguments already validated and normalised by
``portassm.checks`` (every shape consistent, every array of this backend):

``scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, discretization) -> (out, last_state)``
    ``u, delta, z``: (batch, dim, seqlen). ``A``: (dim, dstate).
    ``B``, ``C``: each either (batch, groups, dstate, seqlen), the selective form with
    groups >= 1 dividing dim (channel d uses group d // (dim // groups)), or
    (dim, dstate), the time-invariant form. ``D``, ``delta_bias``: (dim,) or None.
    ``z``: None or as ``u``. ``initial_state``: (batch, dim, dstate) or None (zeros).
    ``discretization``: "mamba", "zoh" or "bilinear".
    Returns ``out`` with u's dtype and ``last_state`` (batch, dim, dstate) in the
    compute dtype (float64 when any input is float64, float32 otherwise).
``scan_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, discretization) -> tuple``
    ``dlast_state`` may be None. Returns the gradients
    ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state)``, each with
    the shape and dtype of its argument, None where the argument was None.
``scan_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, discretization) -> (y, new_state)``
    One token. ``state``: (batch, dim, dstate). ``x, dt, z``: (batch, dim).
    ``B, C``: (batch, groups, dstate) or (dim, dstate). ``y`` has x's dtype;
    ``new_state`` the state's dtype. The state given is not modified.

Optional helpers: ``describe() -> str`` (device and threads, for ``python -m portassm
info``) and ``synchronize()`` (wait for queued device work, for timing).

Optional: keeping the forward's states for the backward (``portassm.scan_with_vjp``).
A module that sets ``SUPPORTS_RESIDUALS = True`` accepts

``scan_fwd(..., save_checkpoints=True) -> (out, last_state, residuals)``
    ``residuals`` is an opaque object of the backend: the states at chunk boundaries,
    O(batch·dim·dstate·seqlen/chunk) memory.
``scan_bwd(..., residuals=residuals)``
    the gradients from those states, on the same arguments as that ``scan_fwd``;
    ``residuals=None`` recomputes them, as without the keyword.

Without ``SUPPORTS_RESIDUALS``, ``scan_with_vjp`` calls ``scan_fwd`` and ``scan_bwd``
as ``scan`` and ``scan_vjp`` do (the backward recomputes).

Optional kernels (``ops`` falls back to its array-API code when absent):
``causal_conv1d(x, weight, bias, activation, initial_state)`` and
``causal_conv1d_step(x, conv_state, weight, bias, activation)``.

Softplus everywhere is the one of mamba_ssm: ``x`` where ``x > 20``, else
``log1p(exp(x))``.
"""

from __future__ import annotations

#: name -> (module, how to install what it needs)
BACKENDS: dict[str, tuple[str, str]] = {
    "numpy": ("portassm.backends.numpy_ref", "pip install portassm"),
    "numba": ("portassm.backends.numba_cpu", "pip install portassm (numba is a core dependency)"),
    "torch": ("portassm.backends.torch_triton", "pip install 'portassm[torch]'"),
    "cupy": (
        "portassm.backends.cupy_cuda",
        "pip install 'portassm[cuda12]' (CUDA 12) or 'portassm[cuda13]' (CUDA 13)",
    ),
}

#: the order in which "auto" tries backends
AUTO_ORDER: tuple[str, ...] = ("numba", "numpy")
