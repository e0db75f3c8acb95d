"""MambaLM's decoding step on the cupy backend: 4 hand-written kernels a layer, graph-capturable.

The generic step (``MambaLM._step_layers``) launches some 20 CuPy operations a layer,
its matrix products through cuBLAS. Launched from Python each costs microseconds of
host time, and CuPy refuses cuBLAS calls inside a stream capture, so that step can be
neither cheap to launch nor captured in a CUDA graph. This module runs the same step
with the kernels of ``cuda_model/decode.cu`` (one RMSNorm + in_proj + conv + SiLU, one
x_proj, one dt_proj + scan step + gating, one out_proj + residual a layer, then the
final norm and the head), on buffers it allocates before the launches. The launches
neither allocate nor wait for the host, so :class:`portassm.model.MambaLM` captures the
whole step in one ``cupy.cuda.Graph``.

The math is the one of ``MambaLM.step``, in the model's dtype (float32 or float64); only
the order of the sums differs from cuBLAS's.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

_DIR = Path(__file__).parent
SOURCE = _DIR / "cuda_model" / "decode.cu"
NVRTC_OPTIONS = ("-std=c++17", "-default-device")  # as the scan kernels (cupy_cuda.NVRTC_OPTIONS)
CTYPES = {"float32": "float", "float64": "double"}
THREADS = 256  # decode.cu's DECODE_THREADS
WARPS = THREADS // 32
MAX_TILE = 8  # batch rows staged at once (the NB template parameter): 1, 2, 4 or 8
MAX_DSTATE = 32  # a warp's lanes per channel at most
_DEFAULT_SMEM = 48 * 1024
_NULL = np.uint64(0)


def source() -> str:
    """decode.cu with ``common.cuh`` (the scan kernels' shared helpers) pasted in place of its #include."""
    common = (_DIR / "cuda" / "common.cuh").read_text()
    return SOURCE.read_text().replace('#include "common.cuh"', common)


def kernel_names(ctype: str, tile: int) -> list[str]:
    """The template instantiations of one module: storage type ``ctype``, ``tile`` batch rows staged at once."""
    return [f"embed_kernel<{ctype}>", f"scan_gate_kernel<{ctype}>"] + [
        f"{name}_kernel<{ctype},{tile}>" for name in ("in_proj", "x_proj", "out_proj", "head")
    ]


def unsupported(config: Any, dtype: str) -> str | None:
    """Why these kernels cannot run a model of ``config`` in ``dtype``, or None."""
    if dtype not in CTYPES:
        return f"dtype {dtype}: the decoding kernels take float32 and float64"
    if config.d_state > MAX_DSTATE:
        return f"d_state {config.d_state}: the decoding kernels take at most {MAX_DSTATE}"
    return None


def tile_rows(batch: int) -> int:
    """The NB instantiation for ``batch`` sequences: the next power of two, at most MAX_TILE."""
    nb = 1
    while nb < min(batch, MAX_TILE):
        nb *= 2
    return nb


def _split(rows: int, K: int, V: int, tile: int = 1) -> int:
    """Warps per output row: enough (warp, row) pairs for the GPU (2048), each warp at least
    one 16-byte vector per lane, and at least tile / 2 rows a block: every block stages the
    tile's input rows (tile * K values) in shared memory, which pays only when several rows
    of the matrix use them. (Measured on the H100 at the 130m size, docs/model.md.)"""
    split = 1
    while (split < WARPS and rows * split < 2048 and K // (2 * split) >= 32 * V
           and WARPS // (2 * split) >= tile // 2):
        split *= 2
    return split


def gemv_grid(rows: int, split: int, sms: int) -> int:
    """Blocks of a matrix-vector kernel: one (group of ``split`` warps) per row, at most 4 a
    multiprocessor (the kernels loop over the rows beyond)."""
    return min(-(-rows * split // WARPS), 4 * sms)


class _Kernels:
    def __init__(self, ctype: str, tile: int) -> None:
        import cupy as cp

        names = kernel_names(ctype, tile)
        module = cp.RawModule(code=source(), options=NVRTC_OPTIONS, name_expressions=names)
        self.embed, self.scan, self.in_proj, self.x_proj, self.out_proj, self.head = (
            module.get_function(n) for n in names
        )
        self.smem: dict[str, int] = {}

    def opt_in(self, name: str, smem: int) -> None:
        """Allow ``smem`` bytes of dynamic shared memory (above 48 KiB needs asking)."""
        if smem > _DEFAULT_SMEM and self.smem.get(name, _DEFAULT_SMEM) < smem:
            getattr(self, name).max_dynamic_shared_size_bytes = smem
            self.smem[name] = smem


_kernels: dict[tuple, _Kernels] = {}
_lock = threading.Lock()


def _get_kernels(ctype: str, tile: int, device: int) -> _Kernels:
    key = (ctype, tile, device)
    found = _kernels.get(key)
    if found is None:
        with _lock:
            found = _kernels.get(key)
            if found is None:
                found = _kernels[key] = _Kernels(ctype, tile)
    return found


class Decoder:
    """The decoding step of one cupy ``MambaLM`` in the kernels of ``decode.cu``.

    Holds the weights as the kernels read them (row-major (out, in) matrices, as the
    checkpoints store them; views of the model's own arrays, copied only where one is
    not contiguous) and, per batch size, the launch shapes.
    """

    def __init__(self, model: Any) -> None:
        import cupy as cp

        self.cp = cp
        c = model.config
        self.config = c
        self.dtype = np.dtype(model.dtype)
        self.ctype = CTYPES[model.dtype]
        self.eps = np.float64(c.norm_eps)
        self.device = model.embedding.device.id
        with model.embedding.device:
            self.sms = cp.cuda.Device(self.device).attributes["MultiProcessorCount"]

            def own(a):  # contiguous, and 16-byte aligned for the vector loads
                if a is None:
                    return None
                a = cp.ascontiguousarray(a)
                return a if a.data.ptr % 16 == 0 else a.copy()

            self.layers = []
            for params, norm, step in zip(model.layers, model.norms, model._steps):
                self.layers.append(dict(
                    norm=own(norm), in_w=own(params["in_proj.weight"]), in_b=own(params.get("in_proj.bias")),
                    conv_w=own(params["conv1d.weight"].reshape(c.d_inner, c.d_conv)),
                    conv_b=own(params.get("conv1d.bias")), x_w=own(params["x_proj.weight"]),
                    dt_w=own(params["dt_proj.weight"]), dt_b=own(params["dt_proj.bias"]), A=own(step.A),
                    D=own(params["D"]), out_w=own(params["out_proj.weight"]), out_b=own(params.get("out_proj.bias")),
                ))
            self.embedding, self.norm_f, self.head = own(model.embedding), own(model.norm_f), own(model.lm_head)
        self.nl = min(32, 1 << (c.d_state - 1).bit_length())
        self._plans: dict[int, dict] = {}
        self._workspaces: dict[int, dict] = {}

    # -- buffers ---------------------------------------------------------------------------------

    def _sizes(self, batch: int) -> dict[str, tuple[int, ...]]:
        c = self.config
        return {
            "h": (batch, c.d_model), "xc": (batch, c.d_inner), "z": (batch, c.d_inner),
            "xdbl": (batch, c.dt_rank + 2 * c.d_state), "y": (batch, c.d_inner), "logits": (batch, c.vocab_size),
        }

    def new_workspace(self, batch: int) -> dict[str, Any]:
        """The step's temporaries and its logits, in one allocation."""
        return self._carve(self._sizes(batch))

    def workspace(self, batch: int) -> dict[str, Any]:
        """A workspace kept for ``batch`` (the in-place step's: one graph per batch size uses it)."""
        ws = self._workspaces.get(batch)
        if ws is None:
            ws = self._workspaces[batch] = self.new_workspace(batch)
        return ws

    def new_cache(self, batch: int) -> list[tuple[Any, Any]]:
        """Uninitialised (conv_state, ssm_state) pairs for every layer, in one allocation."""
        c = self.config
        shapes = {}
        for i in range(c.n_layer):
            shapes[f"conv{i}"] = (batch, c.d_inner, c.d_conv - 1)
            shapes[f"ssm{i}"] = (batch, c.d_inner, c.d_state)
        parts = self._carve(shapes)
        return [(parts[f"conv{i}"], parts[f"ssm{i}"]) for i in range(c.n_layer)]

    def _carve(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
        cp, item = self.cp, self.dtype.itemsize
        offsets, total = {}, 0
        for name, shape in shapes.items():
            offsets[name] = total
            total += -(-int(np.prod(shape)) * item // 256) * 256  # each part 256-byte aligned
        with cp.cuda.Device(self.device):
            mem = cp.cuda.alloc(max(total, 256))
        return {name: cp.ndarray(shape, self.dtype, mem + offsets[name]) for name, shape in shapes.items()}

    # -- launches --------------------------------------------------------------------------------

    def _plan(self, batch: int) -> dict:
        plan = self._plans.get(batch)
        if plan is not None:
            return plan
        c = self.config
        tile = tile_rows(batch)
        V = 16 // self.dtype.itemsize
        item = self.dtype.itemsize
        kernels = _get_kernels(self.ctype, tile, self.device)

        def gemv(name: str, rows: int, K: int) -> tuple:
            split = _split(rows, K, V, tile)
            blocks = gemv_grid(rows, split, self.sms)
            smem = (tile * K + WARPS * tile) * item
            kernels.opt_in(name, smem)
            return (blocks,), smem, np.int32(split), np.int32(K % V == 0)

        plan = dict(
            kernels=kernels,
            embed=(-(-batch * c.d_model // THREADS),),
            scan=(-(-batch * c.d_inner * self.nl // THREADS),),
            in_proj=gemv("in_proj", 2 * c.d_inner, c.d_model),
            x_proj=gemv("x_proj", c.dt_rank + 2 * c.d_state, c.d_inner),
            out_proj=gemv("out_proj", c.d_model, c.d_inner),
            head=gemv("head", c.vocab_size, c.d_model),
        )
        self._plans[batch] = plan
        return plan

    def launches(self, ids: Any, cache_in: list, cache_out: list, ws: dict[str, Any]) -> list[tuple]:
        """The step's kernel launches in order, ``(name, kernel, grid, args, shared_mem)`` each
        (see :meth:`run`); per layer in_proj, x_proj, scan, out_proj; the embedding first, the head last."""
        c = self.config
        batch = int(ids.shape[0])
        plan = self._plan(batch)
        k = plan["kernels"]
        i32 = np.int32
        b, dm, di, dc, rank, ds = i32(batch), i32(c.d_model), i32(c.d_inner), i32(c.d_conv), i32(c.dt_rank), i32(c.d_state)
        h, xc, z, xdbl, y = ws["h"], ws["xc"], ws["z"], ws["xdbl"], ws["y"]
        g_in, s_in, split_in, vec_in = plan["in_proj"]
        g_x, s_x, split_x, vec_x = plan["x_proj"]
        g_out, s_out, split_out, vec_out = plan["out_proj"]
        g_h, s_h, split_h, vec_h = plan["head"]
        width, nl, null = i32(c.dt_rank + 2 * c.d_state), i32(self.nl), _NULL
        out = [("embed", k.embed, plan["embed"], (ids, self.embedding, h, b, dm), 0)]
        for layer, (conv_in, ssm_in), (conv_out, ssm_out) in zip(self.layers, cache_in, cache_out):
            in_b, conv_b, out_b = layer["in_b"], layer["conv_b"], layer["out_b"]
            out += [
                ("in_proj", k.in_proj, g_in, (
                    h, layer["norm"], self.eps, layer["in_w"], null if in_b is None else in_b, conv_in, conv_out,
                    layer["conv_w"], null if conv_b is None else conv_b, xc, z, b, dm, di, dc, split_in, vec_in,
                ), s_in),
                ("x_proj", k.x_proj, g_x, (xc, layer["x_w"], xdbl, b, di, width, split_x, vec_x), s_x),
                ("scan", k.scan, plan["scan"], (
                    xdbl, layer["dt_w"], layer["dt_b"], layer["A"], layer["D"], xc, z, ssm_in, ssm_out, y, b, di,
                    rank, ds, nl,
                ), 0),
                ("out_proj", k.out_proj, g_out, (
                    y, layer["out_w"], null if out_b is None else out_b, h, b, di, dm, split_out, vec_out,
                ), s_out),
            ]
        out.append(("head", k.head, g_h, (
            h, self.norm_f, self.eps, self.head, ws["logits"], b, dm, i32(c.vocab_size), split_h, vec_h,
        ), s_h))
        return out

    def run(self, ids: Any, cache_in: list, cache_out: list, ws: dict[str, Any]) -> Any:
        """Launch one step on the current stream: ``ids`` (batch,) int64 on the device, the
        states read from ``cache_in`` and written to ``cache_out`` (the same arrays for an
        in-place step; every array contiguous, of the model's dtype); returns ``ws["logits"]``."""
        block = (THREADS,)
        for _, kernel, grid, args, smem in self.launches(ids, cache_in, cache_out, ws):
            kernel(grid, block, args, shared_mem=smem)
        return ws["logits"]

    def _as_state(self, a: Any) -> Any:
        return a if a.dtype == self.dtype and a.flags.c_contiguous else self.cp.ascontiguousarray(a, dtype=self.dtype)

    def step(self, ids: np.ndarray, cache: list) -> tuple[Any, list]:
        """``MambaLM.step`` on these kernels: fresh logits and a fresh cache; ``cache`` is left alone."""
        cp = self.cp
        with cp.cuda.Device(self.device):
            ids_dev = cp.asarray(np.ascontiguousarray(ids, dtype=np.int64))
            cache_in = [(self._as_state(conv), self._as_state(ssm)) for conv, ssm in cache]
            cache_out = self.new_cache(ids.shape[0])
            logits = self.run(ids_dev, cache_in, cache_out, self.new_workspace(ids.shape[0]))
        return logits, cache_out

    def step_in_place(self, ids: Any, cache: list) -> Any:
        """The step a CUDA graph captures: device ids in, ``cache`` overwritten, the kept workspace's logits out."""
        for conv, ssm in cache:
            for a in (conv, ssm):
                if a.dtype != self.dtype or not a.flags.c_contiguous:
                    raise ValueError(f"the in-place step needs contiguous {self.dtype} states, got {a.dtype}")
        if ids.dtype != np.int64:
            ids = ids.astype(np.int64)
        return self.run(ids, cache, cache, self.workspace(int(ids.shape[0])))
