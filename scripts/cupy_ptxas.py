"""Resource report of the CuPy backend's kernels, without a GPU.

Compiles ``scan.cu`` / ``step.cu`` with NVRTC to PTX for compute_90 (as the backend
does at run time) and runs ``ptxas -v`` on it for sm_90: registers, spills, shared
memory and stack of every kernel. Needs the NVRTC library (pip install
nvidia-cuda-nvrtc-cu12) and a ``ptxas`` on the PATH.

    python scripts/cupy_ptxas.py [--source scan.cu] [--storage float] [--npt 4] [--nl 16] [--disc 0] [-D NAME=V ...]
    python scripts/cupy_ptxas.py --sass quad    # also the SASS of the kernels whose name holds "quad":
                                                # the instructions of their longest loop by opcode
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from portassm.backends import cupy_cuda
from tests.test_cupy import _NVRTC


def ptx_of(nvrtc: _NVRTC, source: str, names: list[str], options: list[str]) -> str:
    lib = nvrtc.lib
    prog = ctypes.c_void_p()
    text = cupy_cuda.kernel_sources()[source]
    nvrtc._check(lib.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), source.encode(), 0, None, None))
    for expr in names:
        nvrtc._check(lib.nvrtcAddNameExpression(prog, expr.encode()))
    opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
    status = lib.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    nvrtc._check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)))
    log = ctypes.create_string_buffer(size.value)
    nvrtc._check(lib.nvrtcGetProgramLog(prog, log))
    if status != 0:
        raise SystemExit(log.value.decode())
    nvrtc._check(lib.nvrtcGetPTXSize(prog, ctypes.byref(size)))
    ptx = ctypes.create_string_buffer(size.value)
    nvrtc._check(lib.nvrtcGetPTX(prog, ptx))
    return ptx.value.decode()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="scan.cu")
    ap.add_argument("--storage", default="float")
    ap.add_argument("--npt", type=int, default=4)
    ap.add_argument("--nl", type=int, default=16)
    ap.add_argument("--disc", type=int, default=0)
    ap.add_argument("-D", action="append", default=[])
    ap.add_argument("--keep", help="write the PTX here")
    ap.add_argument("--sass", help="disassemble the kernels whose mangled name contains this (cuobjdump on the PATH)")
    a = ap.parse_args()
    compute = "double" if a.storage == "double" else "float"
    names = cupy_cuda.kernel_names(a.source, a.storage, compute, a.npt, a.disc, a.nl)
    options = [*cupy_cuda.NVRTC_OPTIONS, "--gpu-architecture=compute_90", *(f"-D{d}" for d in a.D)]
    ptx = ptx_of(_NVRTC(), a.source, names, options)
    with tempfile.TemporaryDirectory() as tmp:
        path = a.keep or os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        cubin = os.path.join(tmp, "k.cubin")
        r = subprocess.run(["ptxas", "-v", "-arch=sm_90", path, "-o", cubin], check=False, capture_output=True, text=True)
        print(r.stdout + r.stderr)
        if a.sass and r.returncode == 0:
            print_sass(cubin, a.sass)
    return r.returncode


def print_sass(cubin: str, part: str) -> None:
    """Per kernel whose name contains ``part``: its instructions, and those of its longest loop by opcode."""
    import re

    from sass_torch import opcodes  # the same counting as for the torch kernels

    dump = subprocess.run(["cuobjdump", "-sass", cubin], check=True, capture_output=True, text=True).stdout
    for block in dump.split("Function : ")[1:]:
        name = block.split("\n", 1)[0].strip()
        if part not in name:
            continue
        lines = [line for line in block.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line)]
        addr = [int(re.match(r"\s*/\*([0-9a-f]+)\*/", line).group(1), 16) for line in lines]
        best = (0, -1)
        for i, line in enumerate(lines):  # the longest backward branch: the outer loop
            m = re.search(r"BRA (0x[0-9a-f]+)", line)
            if m and int(m.group(1), 16) < addr[i]:
                first = addr.index(int(m.group(1), 16))
                if i - first > best[1] - best[0]:
                    best = (first, i)
        total, inner = sum(opcodes("\n".join(lines)).values()), opcodes("\n".join(lines[best[0] : best[1] + 1]))
        print(f"{name[:100]}: {total} instructions; longest loop {sum(inner.values())}:")
        print("  " + ", ".join(f"{op} {n}" for op, n in inner.most_common()))


if __name__ == "__main__":
    sys.exit(main())
