#!/usr/bin/env bash
# Nsight Compute over the torch backend's default scan kernels (the Gluon forward, in
# float32 and bfloat16, and the Gluon backward), one launch each, at the first anchor size
# (8, 1536, 2048, 16): occupancy, issue slots, warp stall reasons and pipe utilisation.
# Run on the GPU machine, from the repository root:  bash scripts/ncu_torch.sh [OUTDIR]
# (clocks left as they are: --clock-control none). KERNELS overrides the kernel regex.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
outdir="${1:-/tmp}"
script="$(mktemp --suffix=.py)"
cat >"$script" <<'PY'
import torch, portassm
portassm.set_backend("torch")
g = torch.Generator(device="cuda").manual_seed(0)
b, d, L, n = 8, 1536, 2048, 16
def f(*s, dt=torch.float32):
    return torch.randn(*s, device="cuda", generator=g).to(dt)
A = -(torch.rand(d, n, device="cuda", generator=g) * 2.7 + 0.3)
D, bias = f(d), torch.rand(d, device="cuda", generator=g) - 0.5
for _ in range(2):  # the profiled launches are the second round's (kernels compiled)
    for dt in (torch.float32, torch.bfloat16):
        u, z, B, C = f(b, d, L, dt=dt), f(b, d, L, dt=dt), f(b, n, L, dt=dt), f(b, n, L, dt=dt)
        delta = (torch.rand(b, d, L, device="cuda", generator=g) * 3.5 - 3.0).to(dt)
        portassm.scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
    u.requires_grad_(True)
    out = portassm.scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
    out.backward(torch.randn_like(out))
torch.cuda.synchronize()
PY
cd "$here" || exit 1
kernels="${KERNELS:-_scan_(fwd|bwd)_gluon}"
sections=(--section LaunchStats --section Occupancy --section SpeedOfLight --section SchedulerStats
          --section WarpStateStats --section ComputeWorkloadAnalysis --section InstructionStats
          --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section SourceCounters)
# first round: fwd f32, fwd bf16, fwd bf16 (with grad), bwd; the second round's four are profiled
ncu --clock-control none --target-processes all -k regex:"$kernels" --launch-skip 4 \
  --launch-count 4 "${sections[@]}" --print-summary none -o "$outdir/ncu_torch" -f python3 "$script" >"$outdir/ncu_torch_run.txt" 2>&1
status=$?
tail -n 5 "$outdir/ncu_torch_run.txt"
ncu --import "$outdir/ncu_torch.ncu-rep" --page details --print-details all >"$outdir/ncu_torch_details.txt" 2>&1
ncu --import "$outdir/ncu_torch.ncu-rep" --page raw >"$outdir/ncu_torch_raw.txt" 2>&1
grep -E "_scan_|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issue Slots Busy|No Eligible|Eligible Warps|Warp Cycles Per Issued|Duration|Executed Ipc A|Executed Instructions  |L1/TEX Hit|L2 Hit|Local Memory Spill|Shared Memory Configuration Size|Bank" \
  "$outdir/ncu_torch_details.txt" | sed 's/  */ /g' | head -n 90
grep -E "_scan_|issue_stalled_[a-z_]+_per_issue_active.ratio|pipe_[a-z0-9_]+.avg.pct_of_peak_sustained_active" "$outdir/ncu_torch_raw.txt" \
  | awk '/_scan_/ {print substr($0, 1, 70); next}
         {v=$NF; gsub(",", "", v); lim = ($1 ~ /stalled/) ? 0.2 : 5; if (v + 0 >= lim) print "   ", $1, v}' | head -n 120
# shared-memory wavefronts: per kernel, then per SASS opcode from the source page (measured and ideal)
grep -E "_scan_|l1tex__data_pipe_lsu_wavefronts_mem_shared(_op_ld|_op_st)?.sum |l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_(ld|st).sum |smsp__inst_executed_op_shared_(ld|st).sum " \
  "$outdir/ncu_torch_raw.txt" | sed 's/  */ /g' | head -n 40
ncu --import "$outdir/ncu_torch.ncu-rep" --page source --print-source sass --csv >"$outdir/ncu_torch_source.csv" 2>&1
python3 "$here/scripts/ncu_shared_by_opcode.py" "$outdir/ncu_torch_source.csv"
rm -f "$script"
exit $status
