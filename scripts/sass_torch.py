"""Compile the torch backend's Gluon and Triton kernels for sm_90 on the CPU and count the SASS of their loop.

No GPU needed: Triton compiles for an explicit target (``GPUTarget("cuda", 90, 32)``) with the
``ptxas`` and ``nvdisasm`` its wheel ships. Use the Triton of the GPU machine (3.6) for
figures that match it, e.g. ``pip install --target /tmp/tr36 triton==3.6.0`` then
``PYTHONPATH=/tmp/tr36 python scripts/sass_torch.py gluon``.

    python scripts/sass_torch.py {gluon,gluon_bwd,triton} [--bf16] [--set NAME=VALUE ...] [--maxnreg N] [--out DIR]

``gluon``: the Gluon forward; ``gluon_bwd``: the Gluon backward (e.g. ``--set W=4``,
``--set ADJOINT_ONLY=True``); ``triton``: the Triton forward. Prints registers, spills and
shared memory, and the instructions of the main loop by opcode (one loop iteration is one
tile of ``STEPS`` steps); writes the PTX, TTGIR and SASS to DIR.
"""

from __future__ import annotations

import argparse
import ast
import collections
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

TENSORS_16 = ("u_ptr", "delta_ptr", "z_ptr", "out_ptr", "dout_ptr", "du_ptr", "ddelta_ptr", "dz_ptr", "bc_ptr")
COMMON = {"STATE_ONLY": False, "FAST": True}

DEFAULTS = {
    "gluon": {"DSTATE": 16, "SPT": 4, "LPC": 4, "W": 2, "STEPS": 16, "CK": 32, "MODE": 0, "CPT": 1, "SWIZZLE": True,
              "SHFL_SUM": True},
    "gluon_bwd": {"DSTATE": 16, "W": 4, "STEPS": 16, "HAS_Z": True, "ADJOINT_ONLY": False, "BCT": 8, "SWIZZLE": True},
    "triton": {"DSTATE": 16, "BLOCK_D": 32, "STEPS": 16, "CK": 32, "MODE": 0, "B_VARY": True, "C_VARY": True},
}


def opcodes(sass: str) -> collections.Counter:
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
        if m:
            ops[m.group(2).split(".")[0]] += 1
    return ops


def main_loop(sass: str) -> str:
    """The lines of the longest backward branch (the loop over tiles)."""
    lines = sass.splitlines()
    labels = {line[1:].split(":")[0]: i for i, line in enumerate(lines) if line.startswith(".L")}
    best = (0, -1)
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`\(\.(L_x_\d+)\)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i and i - labels[m.group(1)] > best[1] - best[0]:
            best = (labels[m.group(1)], i)
    return "\n".join(lines[best[0] : best[1] + 1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernel", choices=sorted(DEFAULTS))
    parser.add_argument("--bf16", action="store_true", help="16-bit u, delta, z, out (and the packed B, C of the Gluon kernels)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--out", default="/tmp/portassm-sass")
    parser.add_argument("--maxnreg", type=int, default=None, help="register cap passed to ptxas")
    args = parser.parse_args()
    consts = {**COMMON, **DEFAULTS[args.kernel]}
    if args.kernel == "gluon":
        consts.update({"PF": 32, "BCT": 8})
    elif args.kernel == "triton":
        consts.update({"PF": 16, "CDT": tl.float32})
    for item in args.set:
        name, value = item.split("=", 1)
        consts[name] = ast.literal_eval(value)
    if args.kernel == "gluon":
        from triton.experimental.gluon._runtime import GluonASTSource as Source

        from portassm.backends import gluon_kernels

        fn, warps = gluon_kernels._scan_fwd_gluon, consts["W"]
    elif args.kernel == "gluon_bwd":
        from triton.experimental.gluon._runtime import GluonASTSource as Source

        from portassm.backends import gluon_kernels

        fn, warps = gluon_kernels._scan_bwd_gluon, consts["W"]
    else:
        from triton.compiler import ASTSource as Source

        from portassm.backends import triton_kernels

        fn, warps = triton_kernels._scan_fwd_kernel, consts["BLOCK_D"] * 4 // 32
    consts = {n: v for n, v in consts.items() if n in fn.arg_names}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*bf16" if args.bf16 and name in TENSORS_16 else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name in ("seqlen", "chunk_len"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    constexprs = {(fn.arg_names.index(n),): v for n, v in consts.items()}
    src = Source(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, **({"maxnreg": args.maxnreg} if args.maxnreg else {})})
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, args.kernel)
    for ext in ("ptx", "ttgir"):
        with open(f"{base}.{ext}", "w") as f:
            f.write(compiled.asm[ext])
    with open(base + ".cubin", "wb") as f:
        f.write(compiled.asm["cubin"])
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    sass = subprocess.run(
        [os.path.join(bindir, "nvdisasm"), "-c", base + ".cubin"], capture_output=True, text=True, check=True
    )
    with open(base + ".sass", "w") as f:
        f.write(sass.stdout)
    usage = subprocess.run(
        [os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", base + ".cubin"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    loop = opcodes(main_loop(sass.stdout))
    print(f"triton {triton.__version__}, {args.kernel}, {consts}")
    print(
        " ".join(re.findall(r"(REG:\d+|STACK:\d+|SHARED:\d+)", usage)),
        f"(shared by Triton: {compiled.metadata.shared} B)",
    )
    print(
        f"loop: {sum(loop.values())} instructions a tile of {consts['STEPS']} steps, "
        f"{sum(loop.values()) / consts['STEPS']:.1f} a step"
    )
    print("  " + ", ".join(f"{k} {v}" for k, v in loop.most_common()))


if __name__ == "__main__":
    main()
