"""Language-model speed: prefill and decoding tokens/s of MambaLM beside transformers, same weights, same run.

A randomly initialised model of the released 130m size (d_model 768, 24 layers, d_state
16, vocabulary 50280, float32) generates greedily 64 new tokens after a 16-token prompt,
at batch 1 and 8, on each backend of the chosen device; transformers'
``MambaForCausalLM.generate`` runs on the same weights in the same process (its fallback
path: no mamba_ssm or causal_conv1d kernels).

How each figure is measured (the same for both implementations):

* prefill tokens/s = batch * prompt_len / (time of one forward over the prompt, logits of
  the last position only);
* decode tokens/s = batch * (N - 1) / (time of generate(N) - time of generate(1)), N = 64:
  the cost of the N - 1 decoding steps, the prefill taken out;
* the implementations are timed in turns (each repeat runs every one of them once), the
  median taken, so that a change in the machine's load touches every column alike;
* "tokens identical": the share of generated tokens equal to transformers' (float32
  rounding may flip a near-tie of a random model, after which the texts differ);
* on a CUDA GPU each portassm backend has two rows: "graph", the whole decoding step
  replayed as one CUDA graph (``generate(..., cuda_graph=True)``, the default; captured
  in the warm-up), and "eager", the same step launched kernel by kernel from Python.

Usage::

    python benchmarks/bench_model.py                   # CPU: numba, numpy and torch backends, transformers
    python benchmarks/bench_model.py --device cuda     # GPU: torch, cupy, transformers on CUDA
    python benchmarks/bench_model.py --threads 1       # BLAS and torch threads (set before they load)
    python benchmarks/bench_model.py --device cuda --profile-step   # cupy: host and GPU time of a step's parts

Prints one markdown table last, and writes it to $OUT/model_table.md when OUT is set.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="cpu: numba, numpy and torch backends; cuda: torch and cupy (auto: cuda when there is one)")
    parser.add_argument("--backends", nargs="+", help="override the backends of the device")
    parser.add_argument("--size", default="130m", help="preset size (130m, 370m, ...)")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers (quick runs)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure, median (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="BLAS/OpenMP/torch threads (default: the libraries' own)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers reference")
    parser.add_argument("--no-graph", action="store_true", help="on CUDA, decode step by step only (no CUDA graph rows)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile-step", action="store_true",
                        help="cupy: where a decoding step's time goes (host and GPU time of the step and of its "
                             "parts, cupyx.profiler.benchmark), then exit")
    return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads is not None:  # thread pools read these when their library loads
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's portassm
import portassm  # noqa: E402
from portassm.model import MambaConfig, MambaLM  # noqa: E402


def _seconds(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


class Runner:
    """One implementation at one batch: its prefill and generate(n) -> new tokens (batch, n), timed in turns."""

    def __init__(self, name: str, prefill, generate, sync, batch: int, prompt_len: int, new_tokens: int) -> None:
        self.name, self.prefill, self.generate, self.sync = name, prefill, generate, sync
        self.batch, self.prompt_len, self.new_tokens = batch, prompt_len, new_tokens
        self.times: dict[str, list[float]] = {"prefill": [], "one": [], "full": []}
        self.tokens = None

    def warm_up(self) -> None:  # compilation and first allocations stay out of the figures
        self.prefill()
        self.generate(2)

    def time_once(self) -> None:
        self.times["prefill"].append(_seconds(self.prefill, self.sync))
        self.times["one"].append(_seconds(lambda: self.generate(1), self.sync))

        def full():
            self.tokens = self.generate(self.new_tokens)

        self.times["full"].append(_seconds(full, self.sync))

    def replay_ms(self) -> float | None:
        """For a CUDA-graph runner: ms per replay of the captured step, 50 back to back (no host round trip)."""
        graph = getattr(self, "graph", None)
        if graph is None:
            return None
        graph = graph()
        if graph is None:
            return None
        tokens = np.zeros(self.batch, dtype=np.int64)
        graph.acquire(graph.cache)
        try:
            graph.step(tokens)
            self.sync()
            start = time.perf_counter()
            for _ in range(50):
                graph.step(tokens)
            self.sync()
            return (time.perf_counter() - start) / 50 * 1e3
        finally:
            graph.release()

    def result(self) -> dict:
        t = {k: statistics.median(v) for k, v in self.times.items()}
        decode_time = max(t["full"] - t["one"], 1e-9)
        return dict(
            prefill=self.batch * self.prompt_len / t["prefill"],
            decode=self.batch * (self.new_tokens - 1) / decode_time,
            step_ms=decode_time / (self.new_tokens - 1) * 1e3,
            tokens=self.tokens,
        )


def portassm_runners(name: str, config: MambaConfig, weights: dict, ids: np.ndarray, args) -> list[Runner]:
    """One runner, or two on a CUDA GPU: decoding with the whole step in a CUDA graph, and step by step."""
    from portassm.model import _graph_kind

    model = MambaLM(config, weights, backend=name)
    if _graph_kind(model) is None or args.no_graph:
        return [portassm_runner(f"portassm {name}", model, ids, args, False)]
    graph = portassm_runner(f"portassm {name} graph", model, ids, args, True)
    graph.graph = lambda: model._graphs.get(ids.shape[0])  # captured in the warm-up
    return [graph, portassm_runner(f"portassm {name} eager", model, ids, args, False)]


def portassm_runner(label: str, model: MambaLM, ids: np.ndarray, args, cuda_graph: bool) -> Runner:
    sync = getattr(model.backend.module, "synchronize", None)
    if sync is None and model.backend.name == "cupy":
        import cupy

        sync = lambda: cupy.cuda.get_current_stream().synchronize()  # noqa: E731
    if sync is None:  # no way to wait for queued device work: wait for the logits themselves
        sync = lambda: None  # noqa: E731
        prefill = lambda: model.backend.to_numpy(model.forward(ids, last_only=True))  # noqa: E731
    else:
        prefill = lambda: model.forward(ids, last_only=True)  # noqa: E731
    return Runner(
        label,
        prefill,
        lambda n: model.generate(ids, n, temperature=0, cuda_graph=cuda_graph)[:, ids.shape[1]:],
        sync, ids.shape[0], ids.shape[1], args.new_tokens,
    )


def transformers_model(config: MambaConfig, weights_hf: dict, device: str):
    import torch
    import transformers

    hf_config = transformers.MambaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, state_size=config.d_state,
        num_hidden_layers=config.n_layer, expand=config.expand, conv_kernel=config.d_conv,
        time_step_rank=config.dt_rank, use_conv_bias=config.conv_bias, use_bias=config.bias,
        layer_norm_epsilon=config.norm_eps, eos_token_id=None, pad_token_id=None, bos_token_id=None,
    )
    model = transformers.MambaForCausalLM(hf_config)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in weights_hf.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval().to(device)


def transformers_runner(model, ids: np.ndarray, device: str, args) -> Runner:
    import torch

    tids = torch.from_numpy(ids).to(device)

    @torch.no_grad()
    def prefill():
        return model(tids, use_cache=True, logits_to_keep=1).logits

    @torch.no_grad()
    def generate(n):
        out = model.generate(tids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[:, ids.shape[1]:].cpu().numpy()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return Runner("transformers", prefill, generate, sync, ids.shape[0], ids.shape[1], args.new_tokens)


def profile_step(config: MambaConfig, weights: dict, batches, repeats: int = 30) -> str:
    """cupy: host (launch) and GPU time of one decoding step and of its parts, as a markdown table.

    The generic step (CuPy operations and cuBLAS, what ``MambaLM.step`` runs without the
    decoding kernels) is timed whole and operation by operation on layer 0; the step of the
    decoding kernels whole (launched one by one, and one graph replay) and kernel by kernel.
    """
    from cupyx.profiler import benchmark

    from portassm import ops
    from portassm.backends import cupy_decode
    from portassm.model import _CupyGraphStep, _rms_norm

    model = MambaLM(config, weights, backend="cupy")
    decoder = model._decoder
    xp = model.backend.namespace()
    lines = ["| batch | what | host ms | GPU ms |", "|---|---|---|---|"]

    def timed(batch, label, fn, n=repeats):
        r = benchmark(fn, n_repeat=n, n_warmup=3)
        lines.append(f"| {batch} | {label} | {np.median(r.cpu_times) * 1e3:.4f} | {np.median(r.gpu_times[0]) * 1e3:.4f} |")
        print(lines[-1], flush=True)

    def one_batch(batch: int) -> None:
        ids = np.arange(batch, dtype=np.int64) * 7 + 1
        cache = model.init_cache(batch)
        model._decoder = None
        timed(batch, "generic step, whole (CuPy operations, cuBLAS)", lambda: model.step(ids, cache), 10)
        layer, (conv_state, ssm_state) = model._steps[0], cache[0]
        c = config
        h = xp.asarray(np.random.default_rng(0).normal(size=(batch, c.d_model)).astype(np.float32))
        x = _rms_norm(xp, h, layer.norm, c.norm_eps)
        xz = xp.matmul(x, layer.in_w)
        xs, z = xz[:, :c.d_inner], xz[:, c.d_inner:]

        def conv():
            window = xp.concat([conv_state, xs[:, :, None]], axis=-1)
            return ops._silu(xp, xp.sum(window * layer.conv_w, axis=-1) + layer.conv_b)

        xc = conv()
        x_dbl = xp.matmul(xc, layer.x_w)
        dt = xp.matmul(x_dbl[:, :c.dt_rank], layer.dt_w)
        B, C = x_dbl[:, None, c.dt_rank:c.dt_rank + c.d_state], x_dbl[:, None, c.dt_rank + c.d_state:]
        y, _ = model.backend.module.scan_step(ssm_state, xc, dt, layer.A, B, C, layer.D, z, layer.dt_b, True, "mamba")
        for label, fn in [
            ("  layer 0: rms_norm", lambda: _rms_norm(xp, h, layer.norm, c.norm_eps)),
            ("  layer 0: in_proj (cuBLAS)", lambda: xp.matmul(x, layer.in_w)),
            ("  layer 0: conv step + SiLU (5 CuPy operations)", conv),
            ("  layer 0: x_proj (cuBLAS)", lambda: xp.matmul(xc, layer.x_w)),
            ("  layer 0: dt_proj (cuBLAS)", lambda: xp.matmul(x_dbl[:, :c.dt_rank], layer.dt_w)),
            ("  layer 0: scan_step (portassm kernel)", lambda: model.backend.module.scan_step(
                ssm_state, xc, dt, layer.A, B, C, layer.D, z, layer.dt_b, True, "mamba")),
            ("  layer 0: out_proj (cuBLAS)", lambda: xp.matmul(y, layer.out_w)),
            ("  head (cuBLAS, 154 MB at 130m)", lambda: xp.matmul(x, xp.matrix_transpose(model.lm_head))),
        ]:
            timed(batch, label, fn)
        if decoder is None:
            return
        model._decoder = decoder
        timed(batch, "decode.cu step, whole, launched one by one", lambda: model.step(ids, cache), 10)
        graph = _CupyGraphStep(model, batch)
        graph.acquire(cache)
        timed(batch, "decode.cu step, one graph replay", lambda: graph.step(ids))
        graph.release()
        own = decoder.new_cache(batch)
        launches = decoder.launches(xp.asarray(ids), own, own, decoder.new_workspace(batch))
        rows = {"in_proj": (2 * c.d_inner, c.d_model), "x_proj": (c.dt_rank + 2 * c.d_state, c.d_inner),
                "out_proj": (c.d_model, c.d_inner), "head": (c.vocab_size, c.d_model)}
        for name, kernel, grid, args, smem in launches[:5] + launches[-1:]:
            splits = [int(args[-2])] + [s for s in (1, 2, 4, 8) if name in rows and s != int(args[-2])]
            for split in splits:  # the one the decoder chose first, then the others
                if name in rows:
                    grid = (cupy_decode.gemv_grid(rows[name][0], split, decoder.sms),)
                    args = args[:-2] + (np.int32(split), args[-1])
                    tag = f"split {split}{' (chosen)' if split == splits[0] else ''}, "
                else:
                    tag = ""
                ms = _kernel_ms(kernel, grid, args, smem)
                lines.append(f"| {batch} |   decode.cu {name} ({tag}grid {grid[0]}), 20 in a graph | - | {ms:.4f} |")
                print(lines[-1], flush=True)

    for batch in batches:
        one_batch(batch)
    return "\n".join(lines)


def _kernel_ms(kernel, grid, args, smem, n: int = 20) -> float:
    """GPU ms of one launch: n launches captured in a graph, median of 20 replays, divided by n."""
    import cupy
    from cupyx.profiler import benchmark

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        kernel(grid, (256,), args, shared_mem=smem)
        stream.synchronize()
        stream.begin_capture()
        for _ in range(n):
            kernel(grid, (256,), args, shared_mem=smem)
        graph = stream.end_capture()
        r = benchmark(lambda: graph.launch(stream), n_repeat=20, n_warmup=3)
    return float(np.median(r.gpu_times[0])) * 1e3 / n


def main(args: argparse.Namespace) -> int:
    reasons = portassm.available_backends()
    device = args.device
    if device == "auto":
        device = "cuda" if reasons.get("cupy") is None or _torch_cuda() else "cpu"
    wanted = args.backends or (["torch", "cupy"] if device == "cuda" else ["numba", "numpy", "torch"])
    if args.repeats is None:
        args.repeats = 3
    config = MambaConfig.preset(args.size, **({} if args.layers is None else {"n_layer": args.layers}))

    start = time.perf_counter()
    weights = MambaLM.random(config, seed=args.seed, backend="numpy").state_dict()
    print(f"# {args.size}-sized model (d_model {config.d_model}, {config.n_layer} layers, vocab {config.vocab_size}), "
          f"random weights in {time.perf_counter() - start:.1f} s", flush=True)
    if args.profile_step:
        table = profile_step(config, weights, args.batches)
        out_dir = os.environ.get("OUT")
        if out_dir:
            with open(os.path.join(out_dir, "step_profile.md"), "w") as f:
                f.write(table + "\n")
        return 0
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, threads: {args.threads or 'default'}; "
          f"numpy {np.__version__}", flush=True)

    hf = None
    if not args.no_transformers:
        try:
            import torch

            hf = transformers_model(config, {k.replace("backbone.embedding.", "backbone.embeddings."): v
                                             for k, v in weights.items()}, device)
            print(f"# transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
                  f"{torch.get_num_threads()} torch threads", flush=True)
        except ImportError as exc:
            print(f"# transformers unavailable ({exc}); no reference column", flush=True)

    rows = []
    rng = np.random.default_rng(args.seed)
    for batch in args.batches:
        ids = rng.integers(0, config.vocab_size, (batch, args.prompt_len))
        runners = [transformers_runner(hf, ids, device, args)] if hf is not None else []
        for name in wanted:
            if reasons.get(name) is not None:
                print(f"# {name}: skipped ({reasons[name]})", flush=True)
                continue
            if name == "torch" and device == "cpu":
                portassm.set_backend("torch", device="cpu")
            runners.extend(portassm_runners(name, config, weights, ids, args))
        for runner in runners:
            runner.warm_up()
        for _ in range(args.repeats):  # in turns, so that a change of the machine's load touches every column
            for runner in runners:
                runner.time_once()
        reference = runners[0].result() if hf is not None else None
        for runner in runners:
            result = runner.result()
            is_reference = hf is not None and runner is runners[0]
            rows.append((runner.name, batch, result, None if is_reference else reference))
            _print_row(rows[-1])
            replay = runner.replay_ms()
            if replay is not None:
                print(f"{'':22s}   the captured step alone, 50 replays back to back: {replay:.3f} ms a step", flush=True)

    table = _table(rows, device, config, args)
    print()
    print(table)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "model_table.md"), "w") as f:
            f.write(table + "\n")
    return 0


def _torch_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _print_row(row) -> None:
    name, batch, r, _ = row
    print(f"{name:22s} batch {batch}: prefill {r['prefill']:9.1f} tok/s, decode {r['decode']:8.1f} tok/s "
          f"({r['step_ms']:.1f} ms a step)", flush=True)


def _table(rows, device: str, config: MambaConfig, args) -> str:
    lines = [
        f"Greedy decoding, {config.n_layer} layers x d_model {config.d_model} (vocab {config.vocab_size}, float32), "
        f"{args.new_tokens} new tokens after a {args.prompt_len}-token prompt, device {device}, "
        f"median of {args.repeats} run(s):",
        "",
        "| implementation | batch | prefill tokens/s | decode tokens/s | ms per step | decode vs transformers | tokens identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, batch, r, ref in rows:
        ratio = f"{r['decode'] / ref['decode']:.2f}x" if ref is not None else "1.00x" if name == "transformers" else "-"
        same = f"{np.mean(r['tokens'] == ref['tokens']):.0%}" if ref is not None else "-"
        lines.append(f"| {name} | {batch} | {r['prefill']:.1f} | {r['decode']:.1f} | {r['step_ms']:.1f} | {ratio} | {same} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(ARGS))
