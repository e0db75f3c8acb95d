"""What only the numba backend has: its options, its on-disk cache, its own float32
exponential, and the corners of its blocking (channels in blocks of 16, time in chunks
of 64) that the shared suite of test_agreement.py does not reach."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace as replace_case
from pathlib import Path

import numpy as np
import pytest

import portassm

from .helpers import TOLERANCE, make_case, oracle_forward, oracle_grads, rel_err

numba = pytest.importorskip("numba")
numba_cpu = pytest.importorskip("portassm.backends.numba_cpu")
nk = pytest.importorskip("portassm.backends.numba_kernels")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def use_numba():
    with portassm.use_backend("numba") as backend:
        yield backend


# --------------------------------------------------------------------------- options


def test_threads_option_sets_numba_threads():
    before = numba.get_num_threads()
    try:
        portassm.set_backend("numba", threads=1)
        assert numba.get_num_threads() == 1
        # the option is re-applied on the calling thread before each kernel
        numba.set_num_threads(before)
        rng = np.random.default_rng(0)
        portassm.scan(**make_case(rng, dim=20, seqlen=5).astype("float64").kwargs())
        assert numba.get_num_threads() == 1
    finally:
        numba_cpu.configure(threads=None)
        numba.set_num_threads(before)
        portassm.set_backend("auto")


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2"])
def test_threads_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="threads"):
        numba_cpu.configure(threads=bad)


def test_threads_beyond_the_pool_are_refused():
    with pytest.raises(ValueError, match="NUMBA_NUM_THREADS"):
        numba_cpu.configure(threads=numba.config.NUMBA_NUM_THREADS + 1)


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError):
        portassm.set_backend("numba", chunk=32)


def test_results_do_not_depend_on_the_thread_count(use_numba):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one thread only")
    rng = np.random.default_rng(1)
    case = make_case(rng, batch=2, dim=40, seqlen=130, dstate=4, form="grouped", groups=2).astype("float64")
    dout = rng.standard_normal(case.u.shape)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            numba_cpu.configure(threads=threads)
            out = portassm.scan(**case.kwargs())
            grads = portassm.scan_vjp(dout, **case.kwargs())
            results.append((out, *[g for g in grads if g is not None]))
    finally:
        numba_cpu.configure(threads=None)
        numba.set_num_threads(before)
    for one, two in zip(*results):
        # per-thread partial sums of dB and dC add in another order: equal to rounding
        np.testing.assert_allclose(one, two, rtol=1e-13, atol=1e-13)


def test_describe_names_threads_and_simd():
    text = numba_cpu.describe()
    assert "threads" in text and numba.__version__ in text


# --------------------------------------------------------------------------- arrays in and out


def test_gpu_array_is_refused_with_how_to_move_it():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device to make a GPU tensor")
    with pytest.raises(TypeError, match=r"\.cpu\(\)"):
        numba_cpu.asarray(torch.ones(3, device="cuda"))


def test_cpu_torch_tensor_converts():
    torch = pytest.importorskip("torch")
    x = numba_cpu.asarray(torch.arange(4.0))
    assert isinstance(x, np.ndarray) and x.tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------------- the cache


def test_kernels_load_from_the_disk_cache_in_a_fresh_process(tmp_path):
    """The second fresh process finds the first one's compiled kernel (cache=True) and compiles nothing."""
    script = (
        "import numpy as np, portassm\n"
        "from portassm.backends import numba_cpu\n"
        "x = np.ones((1, 3, 5), np.float32); w = np.ones((3, 2), np.float32)\n"
        "portassm.set_backend('numba')\n"
        "portassm.causal_conv1d(x, w, None, 'silu')\n"
        "stats = numba_cpu._causal_conv1d_kernel.stats\n"
        "print(stats.cache_hits.total(), stats.cache_misses.total())\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
            for _ in range(2)]
    (hits1, misses1), (hits2, misses2) = (map(int, r.stdout.split()) for r in runs)
    assert (hits1, misses1) == (0, 1)
    assert (hits2, misses2) == (1, 0)
    assert any(tmp_path.rglob("*.nbi")), "no index file written in NUMBA_CACHE_DIR"


def test_kernels_cached_by_a_smaller_thread_pool_run_in_a_larger_one(tmp_path):
    """A kernel compiled and cached by a 1-thread process runs right in a 4-thread one.

    The scan kernels keep per-thread scratch rows; their count is an argument, so a
    cached kernel does not carry the pool size of the process that compiled it (it did
    once, and a larger pool then wrote past the scratch arrays: heap corruption).
    """
    script = (
        "import numpy as np, portassm\n"
        "rng = np.random.default_rng(0)\n"
        "b, d, L, n = 2, 96, 70, 16\n"
        "u, dt, z = (rng.standard_normal((b, d, L)).astype(np.float32) for _ in range(3))\n"
        "A = -np.exp(rng.standard_normal((d, n))).astype(np.float32)\n"
        "B, C = (rng.standard_normal((b, n, L)).astype(np.float32) for _ in range(2))\n"
        "D = rng.standard_normal(d).astype(np.float32)\n"
        "args = (u, dt, A, B, C, D, z)\n"
        "dout = rng.standard_normal((b, d, L)).astype(np.float32)\n"
        "def run(name):\n"
        "    with portassm.use_backend(name):\n"
        "        y, vjp = portassm.scan_with_vjp(*[a.astype(np.float64) if name == 'numpy' else a for a in args],\n"
        "                                        delta_softplus=True)\n"
        "        return np.asarray(y, np.float64), np.asarray(vjp(dout.astype(y.dtype)).du, np.float64)\n"
        "(y, du), (y0, du0) = run('numba'), run('numpy')\n"
        "rel = lambda a, r: float(np.linalg.norm(a - r) / np.linalg.norm(r))\n"
        "print(rel(y, y0), rel(du, du0))\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    for threads in ("1", "4"):
        try:  # a corrupted heap can hang the process instead of aborting it
            run = subprocess.run([sys.executable, "-c", script], env={**env, "NUMBA_NUM_THREADS": threads},
                                 capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"NUMBA_NUM_THREADS={threads}: no result after 300 s")
        assert run.returncode == 0, f"NUMBA_NUM_THREADS={threads}: exit {run.returncode}\n{run.stderr[-2000:]}"
        err_y, err_du = map(float, run.stdout.split())
        assert err_y < 1e-5 and err_du < 1e-4, (threads, err_y, err_du)


def test_row_panel_product_matches_float64():
    """numba_gemm.matmul: any row count (groups of 8, a partial group), columns not a multiple of the panel width."""
    from portassm.backends import numba_gemm

    rng = np.random.default_rng(3)
    for k, n in ((37, 50), (64, 16), (5, 1)):
        w = rng.standard_normal((k, n)).astype(np.float32)
        packed = numba_gemm.Panels(w)
        for rows in (1, 2, 8, 11, 17):
            x = rng.standard_normal((rows, k)).astype(np.float32)
            got = numba_gemm.matmul(x, packed)
            ref = x.astype(np.float64) @ w.astype(np.float64)
            assert got.shape == (rows, n) and got.dtype == np.float32
            assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-6, (k, n, rows)
    with pytest.raises(ValueError, match="x has 3 columns but W has 37 rows"):
        numba_gemm.matmul(np.ones((2, 3), np.float32), numba_gemm.Panels(np.ones((37, 4), np.float32)))


# --------------------------------------------------------------------------- the float32 exponential


def test_float32_exponential_is_within_float32_rounding():
    x = np.concatenate([np.linspace(-87, 88, 200_001), np.random.default_rng(2).normal(0, 3, 10_000)]).astype(np.float32)
    got = np.array([nk.exp2_f32(np.float32(v * nk.LOG2E)) for v in x[::37]], dtype=np.float64)
    ref = np.exp2((x[::37] * np.float32(nk.LOG2E)).astype(np.float64))  # the same float32 argument, exactly
    assert np.max(np.abs(got - ref) / ref) < 2e-7


def test_float32_exponential_special_values():
    f = lambda v: float(nk.exp2_f32(np.float32(v)))
    assert np.isnan(f(np.nan))
    assert f(np.inf) == np.inf and f(200.0) == np.inf
    assert 0 <= f(-np.inf) < 1.2e-38 and 0 <= f(-500.0) < 1.2e-38
    assert f(0.0) == 1.0 and f(1.0) == 2.0 and f(-3.0) == 0.125


@numba.njit
def _softplus_each(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = nk.softplus(x[i])
    return out


def test_float32_softplus_matches_float64():
    x = np.linspace(-30, 30, 4001).astype(np.float32)
    got = _softplus_each(x).astype(np.float64)
    x64 = x.astype(np.float64)
    ref = np.where(x64 > 20, x64, np.log1p(np.exp(x64)))
    # exp(x) is taken as 2**(x log2 e): rounding x log2 e to float32 costs |x| * 2**-24 relative
    assert np.all(np.abs(got - ref) / ref <= 2e-7 * (1 + np.abs(x64)))
    assert np.max((np.abs(got - ref) / ref)[np.abs(x64) < 2]) < 3e-7


# --------------------------------------------------------------------------- blocking corners


@pytest.mark.parametrize(
    "dim, form, groups",
    [
        (37, "selective", 1),    # 16 + 16 + 5: a partial block of lanes
        (12, "grouped", 4),      # 3 channels a group: blocks narrower than the lanes
        (48, "grouped", 3),      # exactly one block a group
        (10, "invariant", 1),    # time-invariant B and C: per-lane coefficients
    ],
)
@pytest.mark.parametrize("seqlen", [1, 64, 65, 200])  # around the chunk of 64 steps
def test_forward_and_gradients_at_block_and_chunk_edges(use_numba, dim, form, groups, seqlen):
    rng = np.random.default_rng(dim * 1000 + seqlen)
    case = make_case(rng, batch=2, dim=dim, seqlen=seqlen, dstate=3, form=form, groups=groups)
    out, last = portassm.scan(**case.kwargs(), return_last_state=True)
    ref_out, ref_last = oracle_forward(case)
    assert rel_err(out, ref_out) <= TOLERANCE["float64"]
    assert rel_err(last, ref_last) <= TOLERANCE["float64"]
    dout, dlast = rng.standard_normal(case.u.shape), rng.standard_normal(case.initial_state.shape)
    grads = portassm.scan_vjp(dout, **case.kwargs(), dlast_state=dlast)
    _, vjp = portassm.scan_with_vjp(**case.kwargs())  # the backward from the forward's checkpoints
    saved = vjp(dout, dlast)
    for name, got, from_saved, ref in zip(case.ARRAYS, grads, saved, oracle_grads(case, dout, dlast)):
        assert rel_err(got, ref) <= TOLERANCE["float64"], name
        assert rel_err(from_saved, ref) <= TOLERANCE["float64"], name


@pytest.mark.parametrize("seqlen", [1, 64, 1000])
def test_checkpoints_are_the_states_at_chunk_starts(seqlen):
    rng = np.random.default_rng(seqlen)
    case = make_case(rng, batch=2, dim=37, seqlen=seqlen, dstate=5)
    kw = case.kwargs()
    args = (case.u, case.delta, case.A, case.B[:, None], case.C[:, None], case.D, case.z, case.delta_bias,
            True, case.initial_state, "mamba")
    out, last, residuals = numba_cpu.scan_fwd(*args, save_checkpoints=True)
    np.testing.assert_array_equal(out, numba_cpu.scan_fwd(*args)[0])
    chunks = -(-seqlen // numba_cpu.CHUNK)
    blocks = -(-37 // numba_cpu.LANES)  # 16 + 16 + 5 channels
    # memory O(batch * dim * dstate * seqlen / CHUNK): the padded lanes of the last block aside
    assert residuals.states.shape == (2 * blocks, chunks, 5, numba_cpu.LANES)
    assert residuals.nbytes == 2 * blocks * numba_cpu.LANES * 5 * chunks * 8
    for c in range(chunks):
        t = c * numba_cpu.CHUNK
        if t == 0:
            state = case.initial_state
        else:
            head = {k: (v[..., :t] if k in ("u", "delta", "z", "B", "C") else v) for k, v in kw.items()}
            _, state = oracle_forward(replace_case(case, **head))
        for job in range(2 * blocks):
            b, first = divmod(job, blocks)
            d = np.arange(first * 16, min(first * 16 + 16, 37))
            got = residuals.states[job, c, :, : len(d)].T
            assert rel_err(got, state[b, d]) <= TOLERANCE["float64"], (c, job)


def test_residuals_of_another_problem_are_refused():
    rng = np.random.default_rng(0)
    case = make_case(rng, batch=1, dim=20, seqlen=70, dstate=3)
    args = (case.u, case.delta, case.A, case.B[:, None], case.C[:, None], None, None, None, False, None, "mamba")
    _, _, residuals = numba_cpu.scan_fwd(*args, save_checkpoints=True)
    shorter = (case.u[..., :60], case.delta[..., :60], case.A, case.B[:, None, :, :60], case.C[:, None, :, :60],
               None, None, None, False, None, "mamba")
    with pytest.raises(ValueError, match="residuals"):
        numba_cpu.scan_bwd(np.ones((1, 20, 60)), None, *shorter, residuals=residuals)


def test_scan_with_vjp_falls_back_on_backends_without_residuals(monkeypatch, use_numba):
    # ops asks the backend module: without SUPPORTS_RESIDUALS it recomputes, as scan_vjp
    monkeypatch.setattr(numba_cpu, "SUPPORTS_RESIDUALS", False)
    calls = []
    bwd = numba_cpu.scan_bwd
    monkeypatch.setattr(numba_cpu, "scan_bwd", lambda *a, **k: calls.append(k) or bwd(*a, **k))
    rng = np.random.default_rng(1)
    case = make_case(rng, batch=1, dim=5, seqlen=9, dstate=2)
    _, vjp = portassm.scan_with_vjp(**case.kwargs())
    dout = rng.standard_normal(case.u.shape)
    grads = vjp(dout)
    assert calls == [{}]
    for name, got, ref in zip(case.ARRAYS, grads, oracle_grads(case, dout, None)):
        assert rel_err(got, ref) <= TOLERANCE["float64"], name


def test_b_and_c_with_different_groups(use_numba):
    rng = np.random.default_rng(5)
    case = make_case(rng, batch=1, dim=12, seqlen=20, dstate=2, form="grouped", groups=2)
    case.C = rng.standard_normal((1, 3, 2, 20))  # B in 2 groups of 6, C in 3 of 4: blocks of gcd 2
    out = portassm.scan(**case.kwargs())
    assert rel_err(out, oracle_forward(case)[0]) <= TOLERANCE["float64"]
    dout = rng.standard_normal(case.u.shape)
    grads = portassm.scan_vjp(dout, **case.kwargs())
    for name, got, ref in zip(case.ARRAYS, grads, oracle_grads(case, dout, None)):
        assert rel_err(got, ref) <= TOLERANCE["float64"], name


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("dstate", [4, 8])  # 8: the adjoint in LLVM vectors, which also makes y and dC
@pytest.mark.parametrize("invariant", ["B", "C"])
def test_one_of_b_and_c_invariant(use_numba, dtype, dstate, invariant):
    rng = np.random.default_rng(6 + dstate)
    case = make_case(rng, batch=2, dim=20, seqlen=90, dstate=dstate, form="selective")
    setattr(case, invariant, rng.standard_normal((20, dstate)))
    case = case.astype(dtype)
    out = portassm.scan(**case.kwargs())
    assert rel_err(out, oracle_forward(case)[0]) <= TOLERANCE[dtype]
    dout = rng.standard_normal(case.u.shape).astype(dtype)
    _, vjp = portassm.scan_with_vjp(**case.kwargs())
    for name, got, ref in zip(case.ARRAYS, vjp(dout), oracle_grads(case, dout, None)):
        assert rel_err(got, ref) <= TOLERANCE[dtype], name


def test_non_contiguous_gradients(use_numba):
    rng = np.random.default_rng(7)
    case = make_case(rng, batch=2, dim=18, seqlen=70, dstate=5)
    kwargs = case.kwargs()
    for name in ("u", "delta", "z"):
        kwargs[name] = np.asfortranarray(kwargs[name])
    kwargs["A"] = np.asfortranarray(case.A)
    dout = np.asfortranarray(rng.standard_normal(case.u.shape))
    grads = portassm.scan_vjp(dout, **kwargs)
    for name, got, ref in zip(case.ARRAYS, grads, oracle_grads(case, dout, None)):
        assert rel_err(got, ref) <= TOLERANCE["float64"], name


def test_float16_inputs_compute_in_float32(use_numba):
    rng = np.random.default_rng(8)
    case = make_case(rng, batch=1, dim=17, seqlen=40, dstate=4).astype(np.float16)
    out, last = portassm.scan(**case.kwargs(), return_last_state=True)
    assert out.dtype == np.float16 and last.dtype == np.float32
    assert rel_err(last, oracle_forward(case)[1]) <= 1e-5  # the state never passes through float16


def test_long_sequence_float32_stays_within_tolerance(use_numba):
    """4096 steps of the float32 recurrence with the polynomial exponential: no drift."""
    rng = np.random.default_rng(9)
    case = make_case(rng, batch=1, dim=16, seqlen=4096, dstate=16).astype(np.float32)
    out, last = portassm.scan(**case.kwargs(), return_last_state=True)
    ref_out, ref_last = oracle_forward(case)
    assert rel_err(out, ref_out) <= TOLERANCE["float32"]
    assert rel_err(last, ref_last) <= TOLERANCE["float32"]


def test_step_does_not_modify_the_state_and_matches_scan(use_numba):
    rng = np.random.default_rng(10)
    case = make_case(rng, batch=2, dim=33, seqlen=1, dstate=16).astype(np.float32)
    state = case.initial_state.copy()
    y, new = portassm.scan_step(
        state, case.u[..., 0], case.delta[..., 0], case.A, case.B[..., 0], case.C[..., 0], case.D, case.z[..., 0],
        case.delta_bias, True,
    )
    np.testing.assert_array_equal(state, case.initial_state)
    ref_out, ref_last = oracle_forward(case)
    assert rel_err(y, ref_out[..., 0]) <= TOLERANCE["float32"]
    assert rel_err(new, ref_last) <= TOLERANCE["float32"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("method", ["mamba", "zoh"])
def test_large_steps_run_the_parallel_kernel_to_the_same_result(use_numba, monkeypatch, dtype, method):
    # a step of >= STEP_PARALLEL_MIN updates runs the prange kernel over channel blocks;
    # lowering the threshold sends this small one there (blocks of 64: 150 = 64 + 64 + 22)
    rng = np.random.default_rng(11)
    case = make_case(rng, batch=2, dim=150, seqlen=1, dstate=20, form="grouped", groups=5,
                     discretization=method).astype(dtype)
    args = (case.initial_state, case.u[..., 0], case.delta[..., 0], case.A, case.B[..., 0], case.C[..., 0], case.D,
            case.z[..., 0], case.delta_bias, True)
    serial = portassm.scan_step(*args, discretization=method)
    monkeypatch.setattr(numba_cpu, "STEP_PARALLEL_MIN", 0)
    parallel = portassm.scan_step(*args, discretization=method)
    ref_out, ref_last = oracle_forward(case)
    for got, ref in zip(parallel, (ref_out[..., 0], ref_last)):
        assert rel_err(got, ref) <= TOLERANCE[dtype]
    for got, other in zip(parallel, serial):
        assert rel_err(got, other) <= TOLERANCE[dtype]


def test_nan_in_delta_with_softplus_propagates(use_numba):
    rng = np.random.default_rng(11)
    case = make_case(rng, batch=1, dim=3, seqlen=6, options=False)
    case.delta[0, 2, 3] = np.nan
    out = portassm.scan(**case.kwargs())
    assert np.isnan(out[0, 2, 3:]).all() and np.isfinite(out[0, :2]).all() and np.isfinite(out[0, 2, :3]).all()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize(
    "dim, form, groups, options",
    # dstate 16 runs 8 channels at a time where 8 channels stay inside a group of B and C:
    # 8 groups of 5 (no: one channel at a time), 5 of 8, 3 of 12 (no); dim 29 and 70
    # leave channels past the last full 8
    [(40, "grouped", 8, True), (40, "grouped", 5, True), (36, "grouped", 3, True), (29, "selective", 1, True),
     (70, "selective", 1, False)],
)
def test_step_with_dstate_16_by_blocks_of_8_channels(use_numba, monkeypatch, dtype, parallel, dim, form, groups, options):
    rng = np.random.default_rng(12)
    case = make_case(rng, batch=2, dim=dim, seqlen=1, dstate=16, form=form, groups=groups,
                     options=options).astype(dtype)
    if case.initial_state is None:
        case.initial_state = np.zeros((2, dim, 16), dtype)
    if parallel:
        monkeypatch.setattr(numba_cpu, "STEP_PARALLEL_MIN", 0)
    y, new = portassm.scan_step(
        case.initial_state, case.u[..., 0], case.delta[..., 0], case.A, case.B[..., 0], case.C[..., 0], case.D,
        None if case.z is None else case.z[..., 0], case.delta_bias, True,
    )
    ref_out, ref_last = oracle_forward(case)
    assert rel_err(y, ref_out[..., 0]) <= TOLERANCE[dtype]
    assert rel_err(new, ref_last) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("dstate", [8, 16, 24])
@pytest.mark.parametrize("form, groups", [("selective", 1), ("grouped", 2), ("invariant", 1)])
def test_gradients_with_states_by_eights(use_numba, dtype, dstate, form, groups):
    # mamba's adjoint runs 8 states at a time in LLVM vectors when dstate is a multiple of 8
    rng = np.random.default_rng(dstate * 10 + groups)
    case = make_case(rng, batch=2, dim=20, seqlen=70, dstate=dstate, form=form, groups=groups).astype(dtype)
    dout = rng.standard_normal(case.u.shape).astype(dtype)
    dlast = rng.standard_normal(case.initial_state.shape).astype(dtype)
    _, vjp = portassm.scan_with_vjp(**case.kwargs())
    saved = vjp(dout, dlast)
    grads = portassm.scan_vjp(dout, **case.kwargs(), dlast_state=dlast)
    for name, got, from_saved, ref in zip(case.ARRAYS, grads, saved, oracle_grads(case, dout, dlast)):
        assert rel_err(got, ref) <= TOLERANCE[dtype], name
        assert rel_err(from_saved, ref) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("seqlen", [1, 15, 17, 63, 64, 129])  # chunks cut inside a tile of 16 steps
@pytest.mark.parametrize("options", [True, False])
def test_gradients_with_states_by_eights_at_tile_edges(use_numba, dtype, seqlen, options):
    # the vector adjoint moves each chunk's lane rows in 16 x 16 tiles: a last chunk that
    # ends inside a tile, with and without z, D and delta_bias, and time-invariant C
    rng = np.random.default_rng(seqlen * 2 + options)
    case = make_case(rng, batch=1, dim=21, seqlen=seqlen, dstate=8, form="selective", options=options)
    case = replace_case(case, C=rng.standard_normal((21, 8))).astype(dtype)
    dout = rng.standard_normal(case.u.shape).astype(dtype)
    dlast = rng.standard_normal((1, 21, 8)).astype(dtype)
    _, vjp = portassm.scan_with_vjp(**case.kwargs())
    saved = vjp(dout, dlast)
    for name, got, ref in zip(case.ARRAYS, saved, oracle_grads(case, dout, dlast)):
        if ref is None:
            assert got is None, name
        else:
            assert rel_err(got, ref) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transpose16_moves_tiles_both_ways(dtype):
    # rows (lanes, time) to time-major lane vectors and back, at tile offsets in both axes
    @numba.njit
    def run(src, dst, ts, r0, c0):
        nk.transpose16(src, dst, ts, r0, c0)

    rng = np.random.default_rng(7)
    rows = rng.standard_normal((3, 16, 64)).astype(dtype)
    for k in (0, 16, 48):
        tiles = np.full((3, 64, 16), np.nan, dtype)
        run(rows, tiles, 2, 0, k)
        np.testing.assert_array_equal(tiles[2, k:k + 16], rows[2, :, k:k + 16].T)
        assert np.isnan(np.delete(tiles, np.s_[k:k + 16], axis=1)).all()  # nothing else written
        back = np.full((3, 16, 64), np.nan, dtype)
        run(tiles, back, 2, k, 0)
        np.testing.assert_array_equal(back[2, :, k:k + 16], rows[2, :, k:k + 16])


def test_gradients_summed_over_a_long_sequence_keep_float32_accuracy(use_numba):
    """dA and dD sum a term a step over the whole sequence: summed per chunk and then across
    chunks in float64, their float32 results stay near float32 rounding at 2^16 steps
    (a float32 running sum over the sequence was 5e-6 from float64 here, 1.9e-5 at 2^20)."""
    from .helpers import long_scan_arrays

    rng = np.random.default_rng(1)
    arrays = long_scan_arrays(rng, 1, 16, 2**16, 16)
    dout = rng.standard_normal(arrays["u"].shape, dtype=np.float32)
    g32 = portassm.scan_vjp(dout, **arrays, delta_softplus=True)
    g64 = portassm.scan_vjp(dout.astype(np.float64), **{k: v.astype(np.float64) for k, v in arrays.items()},
                            delta_softplus=True)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    errors = {n: rel_err(np.asarray(a), np.asarray(b)) for n, a, b in zip(names, g32, g64)}
    assert errors["A"] <= 1.5e-6 and errors["D"] <= 1.5e-6, errors
