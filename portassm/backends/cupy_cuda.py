"""The CuPy backend: hand-written CUDA C kernels, compiled at run time by NVRTC.

The kernels live in ``cuda/*.cu`` beside this file (``scan.cu``: forward, backward,
chunk combine; ``step.cu``: one decoding step; ``common.cuh``: what they share). Each
source is compiled through ``cupy.RawModule`` once per process for each combination of
storage dtype, states per thread and discretisation that is used (C++ templates
instantiated with ``name_expressions``); CuPy's kernel cache keeps the binaries across
processes. Every launch goes to CuPy's current stream.

Dtypes. float32 and float64 are CuPy's own. CuPy has no bfloat16 of its own: it holds
bfloat16 arrays with the ``ml_dtypes.bfloat16`` dtype (CuPy >= 14 with ml_dtypes
installed), which is what a torch bfloat16 CUDA tensor becomes through DLPack, without a
copy. Where CuPy cannot hold them, a bfloat16 input is a TypeError that says so.
float16, bfloat16 and float32 compute in float32, float64 in float64 (see
``portassm.backends``).

Memory traffic, the figure each kernel is judged by (docs/backends/cupy.md): the
forward reads u, delta, z once and writes out once; the backward reads u, delta, z,
dout once more, writes du, ddelta, dz, and moves the state checkpoints (every 16th
state, never all of them) and the per-block partial sums of dB and dC.
"""

from __future__ import annotations

import math
import threading
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

NAME = "cupy"

__all__ = [  # noqa: RUF022  (the contract's order, then the extras)
    "NAME", "probe", "configure", "namespace", "asarray", "to_numpy", "is_native",
    "scan_fwd", "scan_bwd", "scan_step", "MAX_DSTATE", "kernel_sources", "kernel_names", "NVRTC_OPTIONS",
    "SUPPORTS_RESIDUALS", "Checkpoints",
]

#: ``scan_fwd(..., save_checkpoints=True)`` returns :class:`Checkpoints`, which ``scan_bwd`` accepts
SUPPORTS_RESIDUALS = True

# the kernels' compile-time layout (scan.cu's #defines)
S_LANES = 4  # threads per channel
CH_BLOCK = 32  # channels per block
THREADS = S_LANES * CH_BLOCK
FWD_TT = 32  # time steps per shared-memory tile, forward; chunk lengths are multiples of it
BWD_TT = 16  # ... backward
CKPT_T = 16  # the backward's checkpoint stride
STATES_PER_THREAD = (4, 8, 16)  # compiled variants: dstate <= 16, 32, 64
MAX_DSTATE = S_LANES * STATES_PER_THREAD[-1]

NVRTC_OPTIONS = ("-std=c++17", "-default-device")  # -default-device: lambdas inside kernels are device code
_CUDA_DIR = Path(__file__).with_name("cuda")
_STORAGE = {"float16": "f16_t", "bfloat16": "bf16_t", "float32": "float", "float64": "double"}
_DISC = {"mamba": 0, "zoh": 1, "bilinear": 2}
_DEFAULT_SMEM = 48 * 1024
_MAX_SMEM = 227 * 1024  # a block's shared memory on sm_90, after opting in

_options: dict[str, Any] = {"chunk": None, "min_threads": None, "layout": None, "quad_wide": None}
LAYOUTS = ("lanes", "split", "lanes-bwd")
BW_PAIR = 1  # the backward's full pass with two states per lane (scan_bwd_pair_kernel) where it applies; 0: one
FW_QUAD = 1  # the forward with four states per lane (scan_fwd_quad_kernel) where it applies (mamba, B and C
# selective); 0: two
BW_QUAD = 1  # ... with four states per lane (scan_bwd_quad_kernel) where it applies (mamba, B and C selective); 0: two
LANES = (16, 32)  # lanes per channel of the one-state-per-lane kernels: dstate <= 16, <= 32
#: extra preprocessor definitions for the .cu sources (the benchmark's layout variants)
_defines: tuple[str, ...] = ()
_lock = threading.Lock()
_cp: Any = None


# ---------------------------------------------------------------------------------------
# sources and compilation


def kernel_sources() -> dict[str, str]:
    """Each ``.cu`` file's text with ``common.cuh`` pasted in place of its #include.

    Pasting (rather than ``-I``) keeps the whole text in CuPy's cache key, so an edit
    of the header recompiles.
    """
    common = (_CUDA_DIR / "common.cuh").read_text()
    return {
        path.name: path.read_text().replace('#include "common.cuh"', common)
        for path in sorted(_CUDA_DIR.glob("*.cu"))
    }


def kernel_names(source: str, storage: str, compute: str, npt: int | None, disc: int, nl: int | None = None) -> list[str]:
    """The template instantiations of one module: ``scan.cu`` or ``step.cu``; ``nl``: the
    lanes per channel of the one-state-per-lane kernels (None: those are not compiled)."""
    if source == "scan.cu":
        names = [
            f"scan_fwd_kernel<{storage},{compute},{npt},{disc}>",
            f"scan_bwd_kernel<{storage},{compute},{npt},{disc}>",
            f"chunk_combine_kernel<{compute}>",
        ]
        if nl is not None:
            names.append(f"scan_fwd_lanes_kernel<{storage},{compute},{nl},{disc}>")
            if nl == 16 and compute == "float":
                names.append(f"scan_bwd_lanes_kernel<{storage},{compute},{nl},{disc}>")
                names.append(f"scan_fwd_pair_kernel<{storage},{compute},{disc}>")
                names.append(f"scan_bwd_pair_kernel<{storage},{compute},{disc}>")
                if disc == _DISC["mamba"]:
                    names += [f"scan_fwd_quad_kernel<{storage},{compute},{wide}>" for wide in (0, 1)]
                    names.append(f"scan_bwd_quad_kernel<{storage},{compute}>")
        return names
    return [f"scan_step_kernel<{storage},{compute},{disc}>"]


def _cupy() -> Any:
    global _cp
    if _cp is None:
        import cupy

        _cp = cupy
    return _cp


class _Module:
    """One compiled RawModule and its kernels by name."""

    def __init__(self, source: str, names: list[str], defines: tuple[str, ...]):
        cp = _cupy()
        options = NVRTC_OPTIONS + tuple(f"-D{d}" for d in defines)
        self.module = cp.RawModule(code=kernel_sources()[source], options=options, name_expressions=names)
        self.kernels = {name: self.module.get_function(name) for name in names}
        self.smem_set: dict[str, int] = {}

    def kernel(self, name: str, smem: int) -> Any:
        k = self.kernels[name]
        if smem and self.smem_set.get(name, 0) < smem:
            if smem + k.shared_size_bytes > _DEFAULT_SMEM:
                k.max_dynamic_shared_size_bytes = smem  # opt in above 48 KiB, static and dynamic together
                k.preferred_shared_memory_carveout = 100  # and room for several such blocks a multiprocessor
            self.smem_set[name] = smem
        return k


_modules: dict[tuple, _Module] = {}


def _module(source: str, storage: str, compute: str, npt: int | None, disc: int, nl: int | None = None) -> _Module:
    key = (source, storage, compute, npt, disc, nl, _defines)
    module = _modules.get(key)
    if module is None:
        with _lock:
            module = _modules.get(key)
            if module is None:
                names = kernel_names(source, storage, compute, npt, disc, nl)
                module = _modules[key] = _Module(source, names, _defines)
    return module


# ---------------------------------------------------------------------------------------
# the backend contract: probe, options, arrays


def probe() -> str | None:
    try:
        cp = _cupy()
    except ImportError:
        return "cupy is not installed: pip install 'portassm[cuda12]'"
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001  (no driver, no device: CuPy's own CUDARuntimeError)
        return f"no CUDA device ({type(exc).__name__}: {exc})"
    if count < 1:
        return "no CUDA device"
    return None


def configure(**options: Any) -> None:
    """Options of ``set_backend('cupy', ...)``.

    chunk : int or None
        Cut every sequence into chunks of this many steps (rounded up to a multiple of
        32) scanned in parallel; None (the default) chooses from the problem's size.
    min_threads : int or None
        Below this many threads for batch * dim alone, the sequence is chunked to reach
        about twice as many; None: 256 per multiprocessor (1024 with the "lanes" layout).
    layout : "lanes", "split", "lanes-bwd" or None
        The kernels' thread layout: "lanes", one state per lane (16 or 32 lanes per
        channel; dstate <= 32), or "split", 4 lanes per channel each holding dstate / 4
        states (any dstate up to 64); "lanes-bwd": the lanes backward kernel, every
        forward pass split. None (the default): "lanes" where dstate allows, the faster
        layout as measured on the H100 (docs/backends/cupy.md), else "split".
    quad_wide : bool or None
        The four-states-per-lane forward's instance: True, the lean one at FQ_WIDE_BLOCKS (5)
        blocks a multiprocessor; False, the one at FQ_MIN_BLOCKS (3); None (the default):
        the lean one where the grid exceeds one wave of 3 blocks a multiprocessor.
    """
    unknown = set(options) - set(_options)
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(sorted(unknown))} for the cupy backend; known: {', '.join(_options)}"
        )
    for name, value in options.items():
        if name == "quad_wide":
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"quad_wide must be True, False or None, got {value!r}")
            continue
        if name == "layout":
            if value is not None and value not in LAYOUTS:
                raise ValueError(f"layout must be one of {LAYOUTS} or None, got {value!r}")
            continue
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    _options.update(options)


def namespace() -> Any:
    import array_api_compat.cupy

    return array_api_compat.cupy


@lru_cache(maxsize=1)
def _ndarray() -> type:
    return _cupy().ndarray


def is_native(x: Any) -> bool:
    return isinstance(x, _ndarray())


def _bfloat16_unsupported(what: str, exc: Exception | None = None) -> TypeError:
    version = getattr(_cupy(), "__version__", "?")
    return TypeError(
        f"{what}: CuPy {version} cannot hold bfloat16 arrays here (that needs CuPy >= 14 with ml_dtypes installed"
        f"{'; ' + str(exc) if exc else ''}); convert with x.float(), or use set_backend('torch')"
    )


def asarray(x: Any) -> Any:
    """A CuPy array of ``x``: NumPy arrays are copied to the device; CUDA arrays of other
    libraries (torch tensors ...) are taken through DLPack without a copy."""
    cp = _cupy()
    if isinstance(x, cp.ndarray):
        return x
    if isinstance(x, np.ndarray):
        try:
            return cp.asarray(x)
        except Exception as exc:
            if x.dtype.name == "bfloat16":
                raise _bfloat16_unsupported("a NumPy bfloat16 array", exc) from None
            raise
    dlpack_device = getattr(x, "__dlpack_device__", None)
    if dlpack_device is not None and dlpack_device()[0] in (2, 13):  # kDLCUDA, kDLCUDAManaged
        if hasattr(x, "detach"):
            x = x.detach()  # a torch tensor that requires grad refuses DLPack
        try:
            return cp.from_dlpack(x)
        except Exception as exc:
            if "bfloat16" in str(getattr(x, "dtype", "")):
                raise _bfloat16_unsupported("a bfloat16 tensor", exc) from None
            raise
    if type(x).__module__.split(".")[0] == "torch":
        return asarray(x.detach().cpu().numpy())  # host tensor
    return cp.asarray(np.asarray(x))


def to_numpy(x: Any) -> np.ndarray:
    return _cupy().asnumpy(x)


# ---------------------------------------------------------------------------------------
# launching


def _ptr(a: Any) -> np.uint64:
    return np.uint64(0 if a is None else a.data.ptr)


def _i32(v: int) -> np.int32:
    return np.int32(v)


def _i64(v: int) -> np.int64:
    return np.int64(v)


@cache
def _sm_count(device: int) -> int:
    return int(_cupy().cuda.Device(device).attributes["MultiProcessorCount"])


def _multiprocessors(a: Any) -> int:
    return _sm_count(a.device.id)


def _states_per_thread(dstate: int) -> int:
    for npt in STATES_PER_THREAD:
        if dstate <= S_LANES * npt:
            return npt
    raise ValueError(
        f"the cupy backend's kernels hold at most dstate = {MAX_DSTATE} states per channel, got dstate = {dstate}; "
        "use the numba or torch backend for larger states"
    )


def _lanes(dstate: int) -> int | None:
    """Lanes per channel of the one-state-per-lane kernels for this dstate (None: too large)."""
    for nl in LANES:
        if dstate <= nl:
            return nl
    return None


def _define_int(name: str, default: int) -> int:
    """The value of a -D definition of the benchmark's variants, else the sources' default."""
    for d in _defines:
        key, _, value = d.partition("=")
        if key == name:
            return int(value)
    return default


def _dtype_name(a: Any) -> str:
    return a.dtype.name


@cache
def _group_span(dim: int, groups: int) -> int:
    """The most groups that one block of CH_BLOCK channels touches."""
    cpg = dim // groups
    return max(
        (min(dim, first + CH_BLOCK) - 1) // cpg - first // cpg + 1 for first in range(0, dim, CH_BLOCK)
    )


class _Scan:
    """The arguments of one scan, cast to the kernels' types, with its launch geometry."""

    def __init__(
        self, u, delta, A, B, C, D, z, delta_bias, initial_state, discretization, extra=(), chunk_len=None
    ):
        cp = _cupy()
        self.cp = cp
        self.batch, self.dim, self.seqlen = (int(s) for s in u.shape)
        self.dstate = int(A.shape[1])
        self.npt = _states_per_thread(self.dstate)
        small = [A, D, delta_bias, initial_state] + [M for M in (B, C) if M.ndim == 2]
        big = [u, delta, z, *extra] + [M for M in (B, C) if M.ndim == 4]
        names = {_dtype_name(a) for a in (*small, *big) if a is not None}
        self.wide = "float64" in names
        self.W = cp.float64 if self.wide else cp.float32
        big_names = {_dtype_name(a) for a in big if a is not None}
        if self.wide:
            self.T = cp.float64
        elif len(big_names) == 1:
            self.T = big[0].dtype
        else:  # mixed 16/32-bit inputs: compute from float32 copies rather than round any input
            self.T = cp.float32
        self.storage = _STORAGE[np.dtype(self.T).name]
        self.compute = "double" if self.wide else "float"
        self.disc = _DISC[discretization]
        self.u, self.delta, self.z = (self.big(a) for a in (u, delta, z))
        self.A, self.D, self.delta_bias, self.initial_state = (self.small(a) for a in (A, D, delta_bias, initial_state))
        # B and C share the kernels' one groups count: when both are selective with
        # different groups, each is repeated up to their least common multiple
        gb = B.shape[1] if B.ndim == 4 else None
        gc = C.shape[1] if C.ndim == 4 else None
        self.groups = math.lcm(*(g for g in (gb, gc) if g is not None)) if (gb or gc) else 1
        self.B_repeat = self.groups // gb if gb else 1
        self.C_repeat = self.groups // gc if gc else 1
        self.Bsel = self.big(cp.repeat(B, self.B_repeat, axis=1) if self.B_repeat > 1 else B) if gb else None
        self.Csel = self.big(cp.repeat(C, self.C_repeat, axis=1) if self.C_repeat > 1 else C) if gc else None
        self.Binv = None if gb else self.small(B)
        self.Cinv = None if gc else self.small(C)
        self.gspan = _group_span(self.dim, self.groups) if (gb or gc) else 1
        self.nblk = -(-self.dim // CH_BLOCK)
        layout = _options["layout"] or "lanes"
        nl = _lanes(self.dstate)
        self.nl = nl if layout == "lanes" else None  # the forward passes' layout: lanes, or split (None)
        # the forward with two states per lane (8 lanes per channel): dstate <= 16, float32
        # compute, and each block's channels in one group when B or C is selective
        self.lp_cpb = 4 * _define_int("LP_WARPS", 8)
        self.pair = (
            self.nl == 16
            and not self.wide
            and _define_int("LS_PAIR", 1) != 0
            and ((gb is None and gc is None) or (self.dim // self.groups) % self.lp_cpb == 0)
        )
        # or with four states per lane (4 lanes a channel, 8 channels a warp): mamba's
        # discretisation with B and C both selective, blocks of fq_cpb channels in one group
        self.fq_cpb = 8 * _define_int("FQ_WARPS", 4)
        self.quad = (
            self.pair
            and _define_int("FW_QUAD", FW_QUAD) != 0
            and self.disc == _DISC["mamba"]
            and gb is not None
            and gc is not None
            and (self.dim // self.groups) % self.fq_cpb == 0
        )
        if nl is not None:
            self.ls_threads = 32 * _define_int("LS_WARPS", 8)
            self.ls_cpb = self.ls_threads // nl  # channels per block
            per = 16 // np.dtype(self.T).itemsize
            self.vec_bc = int(
                self.seqlen % per == 0 and all(M is None or M.data.ptr % 16 == 0 for M in (self.Bsel, self.Csel))
            )
        # the one-state-per-lane backward: 16 lanes, float32 compute, and each block's
        # channels in one group (its dB, dC partial sums are per block)
        self.bw_cpb = 2 * _define_int("BW_WARPS", 16)
        self.bw_lanes = (
            layout in ("lanes", "lanes-bwd")
            and nl == 16
            and not self.wide
            and ((gb is None and gc is None) or (self.dim // self.groups) % self.bw_cpb == 0)
        )
        # its full pass with two states per lane (8 lanes per channel), blocks of bp_cpb
        # channels each inside one group
        self.bp_cpb = 4 * _define_int("BP_WARPS", 8)
        self.bw_pair = (
            self.bw_lanes
            and _define_int("BW_PAIR", BW_PAIR) != 0
            and ((gb is None and gc is None) or (self.dim // self.groups) % self.bp_cpb == 0)
        )
        # or with four states per lane (4 lanes a channel, 8 channels a warp): mamba's
        # discretisation with B and C both selective, blocks of bq_cpb channels in one group
        self.bq_warps = _define_int("BQ_WARPS", 4)
        self.bq_cpb = 8 * self.bq_warps
        self.bw_quad = (
            self.bw_pair
            and _define_int("BW_QUAD", BW_QUAD) != 0
            and self.disc == _DISC["mamba"]
            and gb is not None
            and gc is not None
            and (self.dim // self.groups) % self.bq_cpb == 0
        )
        # channels a block of the backward's full pass: the rows of its dB, dC partial sums
        self.part_cpb = self.bq_cpb if self.bw_quad else self.bp_cpb if self.bw_pair else self.bw_cpb
        if chunk_len is None:
            self.chunk_len, self.K = self._chunking(u)
        else:  # the chunks of the forward whose checkpoints the backward reuses
            self.chunk_len, self.K = chunk_len, max(1, -(-self.seqlen // chunk_len))
        self.smem_fwd(), self.smem_bwd()  # a ValueError now, before any launch, when too large
        self.module = _module(
            "scan.cu", self.storage, self.compute, self.npt, self.disc, nl if (self.nl or self.bw_lanes) else None
        )
        self.args_tail = (
            _i32(self.dim), _i32(self.dstate), _i64(self.seqlen), _i32(self.groups), _i32(self.gspan),
            _i64(self.chunk_len),
        )

    def big(self, a):
        if a is None:
            return None
        if a.dtype != self.T:
            a = a.astype(self.T)
        return self.cp.ascontiguousarray(a)

    def small(self, a):
        if a is None:
            return None
        return self.cp.ascontiguousarray(a, dtype=self.W)

    def _chunking(self, u) -> tuple[int, int]:
        L = self.seqlen
        if _options["chunk"] is not None:
            clen = -(-_options["chunk"] // FWD_TT) * FWD_TT
        elif self.quad and _options["min_threads"] is None:
            # four states per lane: below half a wave of blocks (FQ_MIN_BLOCKS a multiprocessor),
            # as many chunks as fill one wave
            blocks = self.batch * (self.dim // self.fq_cpb)
            wave = _define_int("FQ_MIN_BLOCKS", 3) * _multiprocessors(u)
            if 2 * blocks >= wave or L < 512:
                return L, 1
            K = min(max(2, wave // blocks), L // 256)
            per_chunk = -(-L // K)
            clen = -(-per_chunk // FWD_TT) * FWD_TT
        elif self.pair and _options["min_threads"] is None:
            # one wave of the two-states-per-lane forward is 3 blocks of 256 threads per
            # multiprocessor: chunk below half a wave, to about one wave
            threads, wave = self.batch * self.dim * 8, 768 * _multiprocessors(u)
            if 2 * threads >= wave or L < 512:
                return L, 1
            K = min(max(2, wave // threads), L // 256)
            per_chunk = -(-L // K)
            clen = -(-per_chunk // FWD_TT) * FWD_TT
        else:
            if self.nl is None:
                threads = self.batch * self.nblk * THREADS
                floor = _options["min_threads"] or 256 * _multiprocessors(u)
            else:
                threads = self.batch * self.dim * self.nl
                floor = _options["min_threads"] or 1024 * _multiprocessors(u)
            if threads >= floor or L < 512:
                return L, 1
            K = min(-(-2 * floor // threads), L // 256)
            per_chunk = -(-L // K)
            clen = -(-per_chunk // FWD_TT) * FWD_TT
        return clen, -(-L // clen)

    def empty(self, *shape, dtype=None):
        return self.cp.empty(shape, dtype=self.W if dtype is None else dtype)

    def _bc_words(self, TT: int) -> int:
        """Shared-memory words of the B and C tiles: per group and step when selective, per channel when not."""
        NP = S_LANES * self.npt
        return sum(self.gspan * TT * NP if sel else CH_BLOCK * NP for sel in (self.Bsel is not None, self.Csel is not None))

    def _smem(self, words: int) -> int:
        smem = np.dtype(self.W).itemsize * words
        if smem > _MAX_SMEM:
            raise ValueError(
                f"the cupy backend's kernels need {smem} bytes of shared memory for dstate {self.dstate} with "
                f"{self.groups} groups over dim {self.dim} (a block of {CH_BLOCK} channels spans {self.gspan} groups), "
                f"more than the {_MAX_SMEM} a block can have; use fewer groups, or the numba or torch backend"
            )
        return smem

    def smem_fwd(self) -> int:
        return self._smem((2 + S_LANES) * CH_BLOCK * (FWD_TT + 1) + self._bc_words(FWD_TT))

    def smem_bwd(self) -> int:
        return self._smem(
            7 * CH_BLOCK * (BWD_TT + 1) + 2 * CH_BLOCK * S_LANES * BWD_TT + self._bc_words(BWD_TT) + THREADS * self.npt
        )

    @property
    def smem_pair(self) -> int:
        """Dynamic shared memory of the two-states-per-lane backward: 16 steps of two states a lane."""
        return self.bp_cpb * 8 * 16 * 2 * 4

    @property
    def smem_quad(self) -> int:
        """Dynamic shared memory of the four-states-per-lane backward: a warp's 16 steps of 4 states a lane
        (32 slots of 16 bytes a step)."""
        return self.bq_warps * 16 * 32 * 16

    def vec4(self, *rows) -> int:
        """1 when the four-states-per-lane kernels may access 4 steps of each of these (batch, dim,
        seqlen) arrays at once: seqlen a multiple of 4 and each array aligned to 4 elements."""
        width = 4 * np.dtype(self.T).itemsize
        return int(self.seqlen % 4 == 0 and all(a is None or a.data.ptr % width == 0 for a in rows))

    def forward(self, out, h0, h0_chunks, hend, pend, ckpt, nck=0, K=None):
        """One launch of the forward kernel over K chunks (self.K unless given)."""
        K = self.K if K is None else K
        if self.quad:
            # grids over one wave of FQ_MIN_BLOCKS blocks a multiprocessor: the lean instance at
            # FQ_WIDE_BLOCKS (one wave at (4, 5120, 2048) instead of 1.6)
            wide = _options["quad_wide"]
            if wide is None:
                wide = (self.dim // self.fq_cpb) * self.batch * K > _define_int("FQ_MIN_BLOCKS", 3) * _multiprocessors(self.u)
            wide = int(wide)
            kernel = self.module.kernel(f"scan_fwd_quad_kernel<{self.storage},{self.compute},{wide}>", 0)
            vec = self.vec4(self.u, self.delta, self.z, out) | 2 * self.vec4(self.Bsel, self.Csel)
            kernel(
                (self.dim // self.fq_cpb, self.batch, K), (4 * self.fq_cpb,),
                (
                    _ptr(self.u), _ptr(self.delta), _ptr(self.z), _ptr(out), _ptr(self.A), _ptr(self.Bsel),
                    _ptr(self.Binv), _ptr(self.Csel), _ptr(self.Cinv), _ptr(self.D), _ptr(self.delta_bias),
                    _i32(self.softplus), _ptr(h0), _i32(h0_chunks), _ptr(hend), _ptr(pend), _ptr(ckpt), _i32(nck),
                    _i32(self.dim), _i32(self.dstate), _i64(self.seqlen), _i32(self.groups), _i32(vec),
                    _i64(self.chunk_len),
                ),
            )
            return
        if self.pair:
            kernel = self.module.kernel(f"scan_fwd_pair_kernel<{self.storage},{self.compute},{self.disc}>", 0)
            kernel(
                (-(-self.dim // self.lp_cpb), self.batch, K), (8 * self.lp_cpb,),
                (
                    _ptr(self.u), _ptr(self.delta), _ptr(self.z), _ptr(out), _ptr(self.A), _ptr(self.Bsel),
                    _ptr(self.Binv), _ptr(self.Csel), _ptr(self.Cinv), _ptr(self.D), _ptr(self.delta_bias),
                    _i32(self.softplus), _ptr(h0), _i32(h0_chunks), _ptr(hend), _ptr(pend), _ptr(ckpt), _i32(nck),
                    _i32(self.dim), _i32(self.dstate), _i64(self.seqlen), _i32(self.groups), _i64(self.chunk_len),
                ),
            )
            return
        if self.nl is not None:
            kernel = self.module.kernel(f"scan_fwd_lanes_kernel<{self.storage},{self.compute},{self.nl},{self.disc}>", 0)
            kernel(
                (-(-self.dim // self.ls_cpb), self.batch, K), (self.ls_threads,),
                (
                    _ptr(self.u), _ptr(self.delta), _ptr(self.z), _ptr(out), _ptr(self.A), _ptr(self.Bsel),
                    _ptr(self.Binv), _ptr(self.Csel), _ptr(self.Cinv), _ptr(self.D), _ptr(self.delta_bias),
                    _i32(self.softplus), _ptr(h0), _i32(h0_chunks), _ptr(hend), _ptr(pend), _ptr(ckpt), _i32(nck),
                    _i32(self.dim), _i32(self.dstate), _i64(self.seqlen), _i32(self.groups), _i32(self.vec_bc),
                    _i64(self.chunk_len),
                ),
            )
            return
        smem = self.smem_fwd()
        kernel = self.module.kernel(f"scan_fwd_kernel<{self.storage},{self.compute},{self.npt},{self.disc}>", smem)
        kernel(
            (self.nblk, self.batch, K), (THREADS,),
            (
                _ptr(self.u), _ptr(self.delta), _ptr(self.z), _ptr(out), _ptr(self.A), _ptr(self.Bsel),
                _ptr(self.Binv), _ptr(self.Csel), _ptr(self.Cinv), _ptr(self.D), _ptr(self.delta_bias),
                _i32(self.softplus), _ptr(h0), _i32(h0_chunks), _ptr(hend), _ptr(pend), _ptr(ckpt), _i32(nck),
                *self.args_tail,
            ),
            shared_mem=smem,
        )

    def combine(self, init, P, loc, start, final, reverse):
        kernel = self.module.kernel(f"chunk_combine_kernel<{self.compute}>", 0)
        n = self.batch * self.dim * self.dstate
        kernel(
            (-(-n // 256),), (256,),
            (_ptr(init), _ptr(P), _ptr(loc), _ptr(start), _ptr(final), _i64(self.batch * self.dim), _i32(self.K),
             _i32(self.dstate), _i32(reverse)),
        )

    def chained_starts(self, final):
        """The state at each chunk's start (batch, dim, K, dstate), and Abar's product per chunk;
        ``final`` receives the last state."""
        hend = self.empty(self.batch, self.dim, self.K, self.dstate)
        P = self.empty(self.batch, self.dim, self.K, self.dstate)
        self.forward(None, None, 1, hend, P, None)
        hstart = self.empty(self.batch, self.dim, self.K, self.dstate)
        self.combine(self.initial_state, P, hend, hstart, final, 0)
        return hstart, P

    def part_blocks(self) -> int:
        """Rows of the backward's per-block dB, dC partial sums."""
        return -(-self.dim // self.part_cpb) if self.bw_lanes else self.nblk * self.gspan

    def backward(self, dout, g0, g0_chunks, gout, ckpt, nck, grads):
        """The backward kernel's full pass (``grads``) or its chunk pass (None: the adjoint
        through each chunk alone, into ``gout``)."""
        g = grads or {}
        if self.bw_lanes:
            pair = self.bw_pair and grads is not None  # the chunk pass has one state per lane
            vec = self.vec_bc
            if pair and self.bw_quad:
                cpb, lanes, smem = self.bq_cpb, 4, self.smem_quad
                name = f"scan_bwd_quad_kernel<{self.storage},{self.compute}>"
                vec = self.vec4(self.u, self.delta, self.z, dout, g["du"], g["ddelta"], g["dz"])
                vec |= 2 * self.vec4(self.Bsel, self.Csel)
            elif pair:
                cpb, lanes, smem = self.bp_cpb, 8, self.smem_pair
                name = f"scan_bwd_pair_kernel<{self.storage},{self.compute},{self.disc}>"
            else:
                cpb, lanes, smem = self.bw_cpb, 16, 0
                name = f"scan_bwd_lanes_kernel<{self.storage},{self.compute},16,{self.disc}>"
            kernel = self.module.kernel(name, smem)
            grid, block = (-(-self.dim // cpb), self.batch, self.K), (lanes * cpb,)
            tail = (
                _i32(self.dim), _i32(self.dstate), _i64(self.seqlen), _i32(self.groups), _i32(vec),
                _i64(self.chunk_len),
            )
        else:
            smem = self.smem_bwd()
            kernel = self.module.kernel(f"scan_bwd_kernel<{self.storage},{self.compute},{self.npt},{self.disc}>", smem)
            grid, block, tail = (self.nblk, self.batch, self.K), (THREADS,), self.args_tail
        kernel(
            grid, block,
            (
                _ptr(dout), _ptr(self.u), _ptr(self.delta), _ptr(self.z), _ptr(self.A), _ptr(self.Bsel),
                _ptr(self.Binv), _ptr(self.Csel), _ptr(self.Cinv), _ptr(self.D), _ptr(self.delta_bias),
                _i32(self.softplus), _ptr(ckpt), _i32(nck), _ptr(g0), _i32(g0_chunks), _ptr(gout),
                *(_ptr(g.get(name)) for name in (
                    "du", "ddelta", "dz", "dA", "dBinv", "dCinv", "dB", "dC", "dD", "dbias")),
                *tail,
            ),
            shared_mem=smem,
        )

    def group_sum(self, part):
        """(blocks*gspan, batch, dstate, seqlen) partial sums -> (batch, groups, dstate, seqlen), in a fixed order."""
        cp, G = self.cp, self.groups
        cpg = self.dim // G
        if self.bw_lanes:  # blocks of part_cpb channels, each inside one group
            total = part.reshape(G, cpg // self.part_cpb, self.batch, self.dstate, self.seqlen).sum(axis=1)
        elif self.gspan == 1 and cpg % CH_BLOCK == 0:
            total = part.reshape(G, cpg // CH_BLOCK, self.batch, self.dstate, self.seqlen).sum(axis=1)
        else:
            M = np.zeros((G, self.nblk * self.gspan), dtype=np.dtype(self.W))
            for blk in range(self.nblk):
                first = blk * CH_BLOCK // cpg
                for gi in range(self.gspan):
                    if first + gi < G:
                        M[first + gi, blk * self.gspan + gi] = 1
            total = cp.tensordot(cp.asarray(M), part, axes=(1, 0))
        return cp.ascontiguousarray(total.transpose(1, 0, 2, 3))


def _like(grad, arg):
    if arg is None:
        return None
    return grad if grad.dtype == arg.dtype else grad.astype(arg.dtype)


# ---------------------------------------------------------------------------------------
# kernels of the contract


class Checkpoints:
    """What ``scan_fwd(..., save_checkpoints=True)`` keeps for ``scan_bwd``.

    ``states``: the state before every CKPT_T-th step, (batch, dim, ceil(seqlen /
    CKPT_T), dstate) in the compute dtype (1/16 of all states, what the backward would
    otherwise recompute with one more forward pass); ``chunk_len``: the chunk length of
    that forward; ``P``: with several chunks, the product of Abar over each chunk
    (batch, dim, chunks, dstate), which chains the adjoint across chunks; else None.
    """

    __slots__ = ("P", "chunk_len", "states")

    def __init__(self, states, chunk_len: int, P):
        self.states, self.chunk_len, self.P = states, chunk_len, P

    @property
    def nbytes(self) -> int:
        return int(self.states.nbytes) + (0 if self.P is None else int(self.P.nbytes))


def scan_fwd(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, discretization, *, save_checkpoints=False
):
    """The selective scan; see :mod:`portassm.backends` for the normalised argument forms.

    With ``save_checkpoints``, also returns the :class:`Checkpoints` that ``scan_bwd``
    reuses (written by the same pass that writes ``out``).
    """
    s = _Scan(u, delta, A, B, C, D, z, delta_bias, initial_state, discretization)
    s.softplus = bool(delta_softplus)
    out = s.empty(s.batch, s.dim, s.seqlen, dtype=s.T)
    last = s.empty(s.batch, s.dim, s.dstate)
    nck = -(-s.seqlen // CKPT_T) if save_checkpoints else 0
    ckpt = s.empty(s.batch, s.dim, nck, s.dstate) if save_checkpoints else None
    P = None
    if s.batch * s.dim == 0:
        last[...] = 0 if s.initial_state is None else s.initial_state
    elif s.K == 1:
        s.forward(out, s.initial_state, 1, last, None, ckpt, nck)
    else:
        hstart, P = s.chained_starts(last)
        s.forward(out, hstart, s.K, None, None, ckpt, nck)
    out = out if out.dtype == u.dtype else out.astype(u.dtype)
    if save_checkpoints:
        return out, last, Checkpoints(ckpt, s.chunk_len, P if s.K > 1 else None)
    return out, last


def scan_bwd(
    dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, discretization, *,
    residuals=None,
):
    """Gradients ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state)``.

    The states are recomputed: a forward pass keeps every CKPT_T-th state, then the
    backward kernel rebuilds each tile's states from its checkpoint. ``residuals``: the
    :class:`Checkpoints` of ``scan_fwd(..., save_checkpoints=True)`` on the same
    arguments, which spare that forward pass.
    """
    s = _Scan(
        u, delta, A, B, C, D, z, delta_bias, initial_state, discretization, extra=(dout,),
        chunk_len=None if residuals is None else residuals.chunk_len,
    )
    s.softplus = bool(delta_softplus)
    dout_ = s.big(dout)
    dlast = s.small(dlast_state)
    b_, d_, L, N, K = s.batch, s.dim, s.seqlen, s.dstate, s.K
    nck = -(-L // CKPT_T)
    if residuals is None:
        ckpt = s.empty(b_, d_, nck, N)
    else:
        ckpt, P = residuals.states, residuals.P
        if (
            tuple(ckpt.shape) != (b_, d_, nck, N)
            or ckpt.dtype != s.W
            or (K > 1) != (P is not None)
            or (P is not None and (tuple(P.shape) != (b_, d_, K, N) or P.dtype != s.W))
        ):
            raise ValueError(
                f"residuals of shape {tuple(ckpt.shape)} and dtype {ckpt.dtype} (chunk length {residuals.chunk_len}) "
                f"do not belong to this problem (expected {(b_, d_, nck, N)}, {np.dtype(s.W)}): pass those of "
                "scan_fwd on the same arguments"
            )
    if K == 1:
        if residuals is None:
            s.forward(None, s.initial_state, 1, None, None, ckpt, nck)
        g0, g0_chunks, dinit = dlast, 1, None
    else:
        if residuals is None:
            hstart, P = s.chained_starts(None)
            s.forward(None, hstart, K, None, None, ckpt, nck)
        gloc = s.empty(b_, d_, K, N)
        s.backward(dout_, None, 1, gloc, ckpt, nck, None)
        g0 = s.empty(b_, d_, K, N)
        dinit = s.empty(b_, d_, N)
        s.combine(dlast, P, gloc, g0, dinit, 1)
        g0_chunks = K
    gout = s.empty(b_, d_, K, N)
    grads = {
        "du": s.empty(b_, d_, L, dtype=s.T),
        "ddelta": s.empty(b_, d_, L, dtype=s.T),
        "dz": None if s.z is None else s.empty(b_, d_, L, dtype=s.T),
        "dA": s.empty(b_, d_, K, N),
        "dBinv": None if s.Binv is None else s.empty(b_, d_, K, N),
        "dCinv": None if s.Cinv is None else s.empty(b_, d_, K, N),
        "dB": None if s.Bsel is None else s.empty(s.part_blocks(), b_, N, L),
        "dC": None if s.Csel is None else s.empty(s.part_blocks(), b_, N, L),
        "dD": None if s.D is None else s.empty(b_, d_, K),
        "dbias": None if s.delta_bias is None else s.empty(b_, d_, K),
    }
    s.backward(dout_, g0, g0_chunks, gout, ckpt, nck, grads)
    if K == 1:
        dinit = gout.reshape(b_, d_, N)

    def per_channel(part):
        return None if part is None else part.sum(axis=(0, 2))

    dB = per_channel(grads["dBinv"]) if s.Bsel is None else s.group_sum(grads["dB"])
    dC = per_channel(grads["dCinv"]) if s.Csel is None else s.group_sum(grads["dC"])
    if s.B_repeat > 1:
        dB = dB.reshape(b_, s.groups // s.B_repeat, s.B_repeat, N, L).sum(axis=2)
    if s.C_repeat > 1:
        dC = dC.reshape(b_, s.groups // s.C_repeat, s.C_repeat, N, L).sum(axis=2)
    return (
        _like(grads["du"], u), _like(grads["ddelta"], delta), _like(per_channel(grads["dA"]), A), _like(dB, B),
        _like(dC, C), _like(per_channel(grads["dD"]), D), _like(grads["dz"], z),
        _like(per_channel(grads["dbias"]), delta_bias), _like(dinit, initial_state),
    )


class _StepPlan:
    """What a decoding step with given dtypes and forms launches, worked out once and then
    reused every token: the kernel's function pointer, the dtypes, the lanes per channel,
    whether any argument needs a cast, and the thread's kernel-parameter block."""

    def __init__(self, x, state, dt, A, B, C, D, z, dt_bias, disc: str, device: int):
        names = {a.dtype.name for a in (x, state, dt, A, B, C, D, z, dt_bias) if a is not None}
        wide = "float64" in names
        io = {a.dtype.name for a in (x, dt, z, B, C) if a is not None}
        self.T = np.dtype(np.float64) if wide else (x.dtype if len(io) == 1 else np.dtype(np.float32))
        self.W = np.dtype(np.float64) if wide else np.dtype(np.float32)
        storage, compute = _STORAGE[self.T.name], ("double" if wide else "float")
        module = _module("step.cu", storage, compute, None, _DISC[disc])
        kernel = module.kernel(kernel_names("step.cu", storage, compute, None, _DISC[disc])[0], 0)
        self.function = _function_pointer(kernel, device)
        dstate = A.shape[1]
        self.nl = min(32, 1 << (dstate - 1).bit_length())
        # no cast needed: every array already in its kernel dtype (contiguity is checked per call)
        self.exact = all(a is None or a.dtype == self.T for a in (x, dt, z, B, C)) and all(
            a is None or a.dtype == self.W for a in (state, A, D, dt_bias)
        )
        self.same_out = x.dtype == self.T and state.dtype == self.W


def _function_pointer(kernel: Any, device: int) -> int:
    with _cupy().cuda.Device(device):
        return kernel.kernel.ptr


def _device_id(a: Any) -> int:
    return a.data.device_id


_step_plans: dict[tuple, _StepPlan] = {}
_tls = threading.local()
_PARAMS = 20  # scan_step_kernel's parameters


def _param_buffer() -> tuple[Any, int]:
    """This thread's kernel-parameter block: one 8-byte slot per parameter (written with
    struct.pack_into), and the address of the array of pointers to the slots that
    cuLaunchKernel reads (and copies) at the launch."""
    buf = getattr(_tls, "params", None)
    if buf is None:
        import ctypes

        values = (ctypes.c_uint64 * _PARAMS)()
        pointers = (ctypes.c_void_p * _PARAMS)(*(ctypes.addressof(values) + 8 * i for i in range(_PARAMS)))
        _tls.keep = pointers  # (the array of pointers lives as long as the thread)
        buf = _tls.params = (values, ctypes.addressof(pointers))
    return buf


_pack = __import__("struct").Struct(f"<{_PARAMS}Q").pack_into


def _dtype_of(a):
    return None if a is None else a.dtype


def _contiguous(*arrays) -> bool:
    for a in arrays:
        if a is not None and not a._c_contiguous:
            return False
    return True


def scan_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, discretization, *, out=None):
    """One token: ``(y, new_state)``; the state given is not modified unless ``out`` says so.

    out : (y, new_state) or None
        Arrays to write the results into, C-contiguous, of the results' shapes and of the
        dtypes of ``x`` and ``state`` (a ValueError otherwise); ``new_state`` may be
        ``state`` itself (each element is read before it is written, by the same thread),
        so a decoding loop can advance its state in place with no allocation at all.

    The launch path is kept thin (a decoding step is a few microseconds of GPU work): the
    plan is looked up by dtypes; when every array already has its kernel dtype and is
    contiguous, nothing is converted; without ``out``, both outputs share one allocation
    from CuPy's memory pool; the kernel is launched through the driver with a reused
    parameter block, bypassing CuPy's per-argument packing.
    """
    cp = _cp or _cupy()
    batch, dim = x.shape
    dstate = A.shape[1]
    key = (x.dtype, state.dtype, dt.dtype, A.dtype, B.dtype, C.dtype, B.ndim, C.ndim, None if D is None else D.dtype,
           None if z is None else z.dtype, None if dt_bias is None else dt_bias.dtype, discretization, dstate,
           x.data.device_id)
    plan = _step_plans.get(key)
    if plan is None:
        _states_per_thread(dstate)  # the same dstate limit as the scan
        plan = _step_plans[key] = _StepPlan(x, state, dt, A, B, C, D, z, dt_bias, discretization, key[-1])
    T, W = plan.T, plan.W
    if plan.exact and _contiguous(x, dt, z, B, C, state, A, D, dt_bias):
        x_, dt_, z_, B_, C_, state_, A_, D_, bias_ = x, dt, z, B, C, state, A, D, dt_bias
    else:
        def io(a):  # x, dt, z, B, C: T, contiguous
            if a is None or (a.dtype == T and a._c_contiguous):
                return a
            return cp.ascontiguousarray(a, dtype=T)

        def wc(a):  # state, A, D, dt_bias: W, contiguous
            if a is None or (a.dtype == W and a._c_contiguous):
                return a
            return cp.ascontiguousarray(a, dtype=W)

        x_, dt_, z_, B_, C_ = io(x), io(dt), io(z), io(B), io(C)
        state_, A_, D_, bias_ = wc(state), wc(A), wc(D), wc(dt_bias)
    if out is not None:
        y, new_state = out
        if not (
            plan.same_out and y.dtype == T and new_state.dtype == W and y.shape == (batch, dim)
            and new_state.shape == (batch, dim, dstate) and y._c_contiguous and new_state._c_contiguous
        ):
            raise ValueError(
                f"out must be (y, new_state), C-contiguous, of shapes {(batch, dim)} and {(batch, dim, dstate)} and "
                f"dtypes {x.dtype} and {state.dtype}"
                + ("" if plan.same_out else f" (and these inputs compute in {np.dtype(T)}, {np.dtype(W)}: no out here)")
            )
        y_ptr, s_ptr = y.data.ptr, new_state.data.ptr
    else:
        # both outputs in one allocation: the state first, y at the next 256-byte boundary
        y_at = -(-(batch * dim * dstate * W.itemsize) // 256) * 256
        mem = cp.cuda.alloc(y_at + batch * dim * T.itemsize)
        new_state = cp.ndarray((batch, dim, dstate), W, mem)
        y = cp.ndarray((batch, dim), T, mem + y_at)
        s_ptr = mem.ptr
        y_ptr = s_ptr + y_at
    # (groups, batch stride) of B and C: (batch, groups, dstate), or (dim, dstate) time-invariant
    gb, sb = (B_.shape[1], B_.shape[1] * dstate) if B_.ndim == 3 else (dim, 0)
    gc, sc = (C_.shape[1], C_.shape[1] * dstate) if C_.ndim == 3 else (dim, 0)
    threads = batch * dim * plan.nl
    if threads:
        values, pointers = _param_buffer()
        _pack(
            values, 0, state_.data.ptr, x_.data.ptr, dt_.data.ptr, 0 if z_ is None else z_.data.ptr, A_.data.ptr,
            B_.data.ptr, C_.data.ptr, 0 if D_ is None else D_.data.ptr, 0 if bias_ is None else bias_.data.ptr,
            1 if dt_softplus else 0, s_ptr, y_ptr, batch, dim, dstate, gb, gc, sb, sc, plan.nl,
        )
        _launch(
            plan.function, (threads + 127) // 128, 1, 1, 128, 1, 1, 0, cp.cuda.get_current_stream().ptr, pointers, 0
        )
    if plan.same_out or out is not None:
        return y, new_state
    if y.dtype != x.dtype:
        y = y.astype(x.dtype)
    if new_state.dtype != state.dtype:
        new_state = new_state.astype(state.dtype)
    return y, new_state


@lru_cache(maxsize=1)
def _driver():
    from cupy_backends.cuda.api import driver

    return driver


def _launch(*args):
    """cuLaunchKernel through CuPy's driver binding (bound on first use)."""
    global _launch
    _launch = _driver().launchKernel
    return _launch(*args)
