"""Argument validation and normalisation, shared by every backend.

Every public op passes its arrays through here before any kernel runs, so every backend
fails the same way on the same bad input. Messages name the argument, what was expected
and what came: ``B has seqlen 100 but u has seqlen 128``.

Normalisation gives the kernels one form per argument (see :mod:`portassm.backends`):
the selective B and C of shape (batch, dstate, seqlen) become (batch, 1, dstate, seqlen).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .discretization import METHODS
from .errors import ShapeError

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
ACTIVATIONS = (None, "silu", "swish")


_dtype_names: dict[Any, str] = {}


def dtype_name(x: Any) -> str:
    """'float32' for numpy.float32, torch.float32, cupy's float32 ... (cached: str() of a dtype is slow)."""
    dtype = x.dtype
    try:
        return _dtype_names[dtype]
    except KeyError:
        name = _dtype_names[dtype] = str(dtype).rsplit(".", 1)[-1]
        return name


_libraries: dict[type, str] = {}
_is_float: dict[Any, bool] = {}
#: per backend module, (array type, dtype) -> whether such arrays are the backend's own floating arrays
_native_float: dict[Any, dict[tuple[Any, Any], bool]] = {}


def library(x: Any) -> str:
    """The top-level module of an array's type: 'numpy', 'torch', 'cupy' ..."""
    kind = type(x)
    try:
        return _libraries[kind]
    except KeyError:
        name = _libraries[kind] = kind.__module__.split(".", 1)[0]
        return name


def to_backend(backend: Any, **arrays: Any) -> dict[str, Any]:
    """Check that the arrays are real floating arrays of one library, and move them to the backend's arrays.

    NumPy arrays mix with any library; arrays of two other libraries (a torch tensor
    and a cupy array, say) are refused. This runs on every call, decoding steps
    included, so it is kept lean.
    """
    is_native = backend.module.is_native
    for x in arrays.values():  # the common case: the backend's own float arrays, nothing to do
        if x is not None and not (is_native(x) and _is_float.get(x.dtype, False)):
            break
    else:
        return arrays
    foreign: dict[str, str] = {}
    convert = []
    for name, x in arrays.items():
        if x is None:
            continue
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        kind = dtype_name(x)
        _is_float[x.dtype] = kind in FLOAT_DTYPES
        if kind not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a real floating array ({', '.join(FLOAT_DTYPES)}), got dtype {kind}")
        lib = library(x)
        if lib != "numpy":
            foreign.setdefault(lib, name)
        if not is_native(x):
            convert.append(name)
    if len(foreign) > 1:
        which = ", ".join(f"{name} is a {lib} array" for lib, name in foreign.items())
        raise TypeError(f"arrays of more than one library: {which}; pass arrays of one library (NumPy arrays mix with any)")
    for name in convert:
        try:
            arrays[name] = backend.module.asarray(arrays[name])
        except TypeError as exc:
            raise TypeError(f"{name}: {exc}") from None
    return arrays


def check_ndim(name: str, x: Any, forms: dict[int, str]) -> int:
    """Check that x.ndim is one of ``forms`` (ndim -> what the axes mean); returns it."""
    if x is None:
        expected = " or ".join(forms.values())
        raise TypeError(f"{name} is required: pass an array of shape {expected}, got None")
    ndim = x.ndim
    if ndim not in forms:
        expected = " or ".join(f"{n}-dimensional {meaning}" for n, meaning in forms.items())
        raise ShapeError(f"{name} must be {expected}, got shape {tuple(x.shape)}")
    return ndim


def check_size(name: str, x: Any, axis: int, what: str, ref_name: str, expected: int) -> None:
    if x.shape[axis] != expected:
        raise ShapeError(f"{name} has {what} {x.shape[axis]} but {ref_name} has {what} {expected}")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"discretization must be one of {', '.join(METHODS)}, got {method!r}")
    return method


_SCAN_BC_FORMS = {2: "(dim, dstate), time-invariant", 3: "(batch, dstate, seqlen)", 4: "(batch, groups, dstate, seqlen)"}
_STEP_BC_FORMS = {2: "(batch, dstate)", 3: "(batch, groups, dstate)"}


@dataclass
class ScanArgs:
    """The arguments of a scan after validation: kernels' forms, plus what maps gradients back."""

    u: Any
    delta: Any
    A: Any
    B: Any
    C: Any
    D: Any
    z: Any
    delta_bias: Any
    initial_state: Any
    B_was_3d: bool
    C_was_3d: bool
    batch: int
    dim: int
    seqlen: int
    dstate: int


def _selective_or_invariant(name: str, M: Any, batch: int, dim: int, seqlen: int, dstate: int) -> tuple[Any, bool]:
    ndim = check_ndim(name, M, _SCAN_BC_FORMS)
    if ndim == 2:
        check_size(name, M, 0, "dim", "u", dim)
        check_size(name, M, 1, "dstate", "A", dstate)
        return M, False
    check_size(name, M, 0, "batch", "u", batch)
    check_size(name, M, -1, "seqlen", "u", seqlen)
    check_size(name, M, -2, "dstate", "A", dstate)
    if ndim == 3:
        return M[:, None], True
    groups = M.shape[1]
    if groups < 1 or dim % groups:
        raise ShapeError(f"{name} has {groups} groups, which does not divide dim {dim} of u")
    return M, False


def _per_channel(name: str, x: Any, dim: int, ref_name: str = "u") -> None:
    if x is not None:
        check_ndim(name, x, {1: "(dim,)"})
        check_size(name, x, 0, "dim", ref_name, dim)


def scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, discretization) -> ScanArgs:
    """Validate the arguments of :func:`portassm.scan` (arrays already of one backend)."""
    check_method(discretization)
    check_ndim("u", u, {3: "(batch, dim, seqlen)"})
    batch, dim, seqlen = (int(s) for s in u.shape)
    check_ndim("delta", delta, {3: "(batch, dim, seqlen)"})
    for axis, what in enumerate(("batch", "dim", "seqlen")):
        check_size("delta", delta, axis, what, "u", u.shape[axis])
    check_ndim("A", A, {2: "(dim, dstate)"})
    check_size("A", A, 0, "dim", "u", dim)
    dstate = int(A.shape[1])
    if dstate < 1:
        raise ShapeError("A has dstate 0; the state needs at least one dimension")
    B, B3 = _selective_or_invariant("B", B, batch, dim, seqlen, dstate)
    C, C3 = _selective_or_invariant("C", C, batch, dim, seqlen, dstate)
    _per_channel("D", D, dim)
    _per_channel("delta_bias", delta_bias, dim)
    if z is not None:
        check_ndim("z", z, {3: "(batch, dim, seqlen)"})
        for axis, what in enumerate(("batch", "dim", "seqlen")):
            check_size("z", z, axis, what, "u", u.shape[axis])
    if initial_state is not None:
        check_state("initial_state", initial_state, batch, dim, dstate)
    return ScanArgs(u, delta, A, B, C, D, z, delta_bias, initial_state, B3, C3, batch, dim, seqlen, dstate)


def check_state(name: str, state: Any, batch: int, dim: int, dstate: int) -> None:
    check_ndim(name, state, {3: "(batch, dim, dstate)"})
    check_size(name, state, 0, "batch", "u", batch)
    check_size(name, state, 1, "dim", "u", dim)
    check_size(name, state, 2, "dstate", "A", dstate)


def native_step_args(backend: Any, state, x, dt, A, B, C, D, z, dt_bias, discretization) -> tuple[Any, Any] | None:
    """The decoding fast path of :func:`portassm.scan_step`: ``(B, C)`` as (batch, 1, dstate)
    when every array is already the backend's own floating array, of the usual shapes
    (single-group B and C), and the method is known; ``None`` otherwise, and the caller
    then runs :func:`to_backend` and :func:`step_args`, which convert and explain.

    Decoding calls this once a token and layer, so it does no more than a dictionary lookup
    an array (is it the backend's own floating array? cached by type and dtype) and plain
    tuple comparisons of the shapes (torch's ``Size`` arithmetic costs more than a tuple's).
    """
    if state is None or x is None or dt is None or A is None or B is None or C is None:
        return None  # the caller's checks name the missing one
    module = backend.module
    known = _native_float.get(module)
    if known is None:
        known = _native_float[module] = {}
    for v in (state, x, dt, A, B, C, D, z, dt_bias):
        if v is None:
            continue
        key = (type(v), v.dtype)
        ok = known.get(key)
        if ok is None:
            ok = known[key] = bool(module.is_native(v)) and dtype_name(v) in FLOAT_DTYPES
        if not ok:
            return None
    shape = x.shape
    if len(shape) != 2 or dt.shape != shape or discretization not in METHODS:
        return None
    batch, dim = shape
    a_shape = A.shape
    if len(a_shape) != 2 or a_shape[0] != dim:
        return None
    bn = (batch, a_shape[1])
    if (
        B.shape != bn or C.shape != bn or state.shape != (batch, dim, bn[1])
        or (z is not None and z.shape != shape) or (D is not None and D.shape != (dim,))
        or (dt_bias is not None and dt_bias.shape != (dim,))
    ):
        return None
    return B[:, None], C[:, None]


def step_args(state, x, dt, A, B, C, D, z, dt_bias, discretization) -> tuple[Any, Any]:
    """Validate the arguments of :func:`portassm.scan_step`; returns B and C as (batch, groups, dstate)."""
    # decoding calls this once a token: accept the usual case with a few tuple
    # comparisons, and leave the detailed checks (and their messages) to the rest
    # (a missing array skips them: check_ndim below names it)
    missing = state is None or x is None or dt is None or A is None or B is None or C is None
    shape = () if missing else x.shape
    if (
        len(shape) == 2 and dt.shape == shape and A.ndim == 2 and A.shape[0] == shape[1]
        and B.shape == C.shape == (shape[0], A.shape[1]) and state.shape == (*shape, A.shape[1])
        and (z is None or z.shape == shape) and (D is None or D.shape == shape[1:])
        and (dt_bias is None or dt_bias.shape == shape[1:]) and discretization in METHODS
    ):
        return B[:, None], C[:, None]
    check_method(discretization)
    check_ndim("x", x, {2: "(batch, dim)"})
    batch, dim = (int(s) for s in x.shape)
    check_ndim("dt", dt, {2: "(batch, dim)"})
    check_size("dt", dt, 0, "batch", "x", batch)
    check_size("dt", dt, 1, "dim", "x", dim)
    check_ndim("A", A, {2: "(dim, dstate)"})
    check_size("A", A, 0, "dim", "x", dim)
    dstate = int(A.shape[1])
    normalised = []
    for name, M in (("B", B), ("C", C)):
        check_ndim(name, M, _STEP_BC_FORMS)
        check_size(name, M, 0, "batch", "x", batch)
        check_size(name, M, -1, "dstate", "A", dstate)
        if M.ndim == 2:
            M = M[:, None]
        elif M.shape[1] < 1 or dim % M.shape[1]:
            raise ShapeError(f"{name} has {M.shape[1]} groups, which does not divide dim {dim} of x")
        normalised.append(M)
    _per_channel("D", D, dim, "x")
    _per_channel("dt_bias", dt_bias, dim, "x")
    if z is not None:
        check_ndim("z", z, {2: "(batch, dim)"})
        check_size("z", z, 0, "batch", "x", batch)
        check_size("z", z, 1, "dim", "x", dim)
    check_ndim("state", state, {3: "(batch, dim, dstate)"})
    check_size("state", state, 0, "batch", "x", batch)
    check_size("state", state, 1, "dim", "x", dim)
    check_size("state", state, 2, "dstate", "A", dstate)
    return normalised[0], normalised[1]


def conv_args(x, weight, bias, activation, state, state_name: str) -> None:
    """Validate a depthwise causal convolution: x (batch, dim, seqlen) or (batch, dim) for a step."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    check_ndim("weight", weight, {2: "(dim, width)"})
    check_size("weight", weight, 0, "dim", "x", x.shape[1])
    if weight.shape[1] < 1:
        raise ShapeError("weight has width 0; the convolution needs at least one tap")
    if bias is not None:
        check_ndim("bias", bias, {1: "(dim,)"})
        check_size("bias", bias, 0, "dim", "x", x.shape[1])
    if state is not None:
        check_ndim(state_name, state, {3: "(batch, dim, width - 1)"})
        check_size(state_name, state, 0, "batch", "x", x.shape[0])
        check_size(state_name, state, 1, "dim", "x", x.shape[1])
        if state.shape[2] != weight.shape[1] - 1:
            raise ShapeError(
                f"{state_name} holds {state.shape[2]} past inputs but weight of width {weight.shape[1]} needs {weight.shape[1] - 1}"
            )
