"""Reproduce the paper's synthetic tasks: selection against time invariance.

``python -m portassm reproduce selective-copying`` and ``... induction-heads`` train a
small Mamba language model (2 layers, d_model 64, d_state 16, as in the paper's
synthetic experiments) twice, once with each layer, and print a table like the paper's
Tables 1 and 2, with a plot of accuracy over training:

* ``s6``: the selective layer, :func:`portassm.mamba_block` itself: Δ, B and C are
  projections of the input, so the layer can decide per token what to keep.
* ``s4``: the same block with a time-invariant layer: B and C are parameters of shape
  (d_inner, d_state) (the time-invariant form of :func:`portassm.scan`) and Δ a learned
  per-channel constant, softplus of a bias, with no input dependence. The projections,
  the convolution and the gate are those of the Mamba block, so the two models differ
  in selection alone (the paper's "Mamba architecture, S4 layer" row).

Training runs on the ``torch`` backend with torch autograd: the block's parameters are
torch tensors requiring grad, and :func:`portassm.scan` is differentiable (Triton
kernels on CUDA, plain torch on the CPU). Data is drawn fresh every step from
:mod:`portassm.tasks`; accuracy is measured on a fixed validation set drawn from
another stream of the same seed. Everything else (embedding, RMSNorm, tied head,
AdamW) is ordinary torch, imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import ops, tasks
from .backend import use_backend
from .block import init_block_params, mamba_block

LAYERS = ("s6", "s4")
LAYER_NAMES = {"s6": "S6", "s4": "S4 (time-invariant)"}

#: the paper's figures, for the table (Table 1: selective copying; Table 2: induction heads)
PAPER = {
    "selective-copying": {"s6": "99.8%", "s4": "56.4%"},
    "induction-heads": {"s6": "≈100% to 1M", "s4": "-"},
}


# ----------------------------------------------------------------------------- models


def _torch():
    import torch

    return torch


def _as_parameters(arrays: dict[str, Any]) -> Any:
    """``{"in_proj.weight": tensor}`` -> a ParameterDict keyed ``in_proj__weight`` (no dots allowed there)."""
    torch = _torch()
    return torch.nn.ParameterDict({key.replace(".", "__"): torch.nn.Parameter(value) for key, value in arrays.items()})


def _as_mapping(params: Any) -> dict[str, Any]:
    return {key.replace("__", "."): value for key, value in params.items()}


def make_mixer(layer: str, d_model: int, d_state: int, seed: int) -> Any:
    """The sequence mixer of one layer: ``"s6"`` (the Mamba block) or ``"s4"`` (its time-invariant twin).

    Returns
    -------
    torch.nn.Module
        Maps (batch, seqlen, d_model) to (batch, seqlen, d_model); its parameters live
        on the torch backend's device and are keyed like mamba_ssm's (dots as ``__``).
    """
    torch = _torch()
    block = init_block_params(d_model, d_state, seed=seed)
    # the classes live in here so that importing this module (the CLI does) never imports torch

    class SelectiveMixer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.params = _as_parameters(block)

        def forward(self, x):
            return mamba_block(x, _as_mapping(self.params))

    class TimeInvariantMixer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d_inner = block["A_log"].shape[0]
            rng = np.random.default_rng(seed)
            kept = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "A_log", "D", "out_proj.weight")
            arrays = {key: block[key] for key in kept}
            like = block["A_log"]
            # S4D's initialisation: B = 1, C random; Δ starts as the Mamba block's dt_proj.bias
            arrays["B"] = torch.ones_like(like)
            arrays["C"] = torch.as_tensor(
                rng.standard_normal((d_inner, d_state)) / math.sqrt(d_state), dtype=like.dtype, device=like.device
            )
            arrays["dt_bias"] = block["dt_proj.bias"]
            self.params = _as_parameters(arrays)

        def forward(self, x):
            p = _as_mapping(self.params)
            d_inner = p["A_log"].shape[0]
            xz = x @ p["in_proj.weight"].T
            xs, z = xz[..., :d_inner].transpose(1, 2), xz[..., d_inner:].transpose(1, 2)
            xs = ops.causal_conv1d(xs, p["conv1d.weight"][:, 0, :], p["conv1d.bias"], "silu")
            # Δ = softplus(0 + dt_bias): the same step at every token, whatever the token
            y = ops.scan(
                xs, torch.zeros_like(xs), -torch.exp(p["A_log"]), p["B"], p["C"], p["D"], z, p["dt_bias"], True
            )
            return y.transpose(1, 2) @ p["out_proj.weight"].T

    if layer == "s6":
        return SelectiveMixer()
    if layer == "s4":
        return TimeInvariantMixer()
    raise ValueError(f"layer must be one of {', '.join(LAYERS)}, got {layer!r}")


def make_model(
    layer: str,
    vocab_size: int = tasks.VOCAB_SIZE,
    d_model: int = 64,
    n_layers: int = 2,
    d_state: int = 16,
    seed: int = 0,
) -> Any:
    """A small language model: embedding, ``n_layers`` pre-norm residual mixers, RMSNorm, tied head.

    Call it inside ``use_backend("torch", device=...)``: the mixers' parameters are made
    on that device, and the rest is moved there.

    Returns
    -------
    torch.nn.Module
        Maps token ids (batch, seqlen) to logits (batch, seqlen, vocab_size).
    """
    torch = _torch()
    torch.manual_seed(seed)

    class SyntheticLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = torch.nn.Embedding(vocab_size, d_model)
            torch.nn.init.normal_(self.embedding.weight, std=0.02)
            self.mixers = torch.nn.ModuleList(make_mixer(layer, d_model, d_state, seed * 1000 + i) for i in range(n_layers))
            self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(d_model, eps=1e-5) for _ in range(n_layers))
            self.norm_f = torch.nn.RMSNorm(d_model, eps=1e-5)

        def forward(self, tokens):
            x = self.embedding(tokens)
            for norm, mixer in zip(self.norms, self.mixers):
                x = x + mixer(norm(x))
            return self.norm_f(x) @ self.embedding.weight.T  # tied head

    model = SyntheticLM()
    device = next(iter(model.mixers[0].params.values())).device
    return model.to(device)


# ----------------------------------------------------------------------------- training


@dataclass
class Settings:
    """One reproduction run: the task, the optimisation and the evaluation."""

    task: str
    seqlen: int
    steps: int
    batch: int
    lr: float
    seed: int = 0
    device: str = "auto"
    layers: tuple[str, ...] = LAYERS
    weight_decay: float = 0.1
    warmup: int = 0
    eval_every: int = 0
    eval_samples: int = 512
    test_lengths: tuple[int, ...] = ()
    n_memorize: int = tasks.N_MEMORIZE
    test_samples: int = 256
    max_eval_tokens: int = 1 << 21
    d_model: int = 64
    n_layers: int = 2
    d_state: int = 16
    threads: int = 0
    time_limit: float = 0.0
    stop_at: float = 0.0

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if _torch().cuda.is_available() else "cpu"


@dataclass
class Result:
    """What one layer's run measured."""

    layer: str
    steps: list[int] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    accuracy: float = float("nan")
    steps_done: int = 0
    test_accuracy: dict[int, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    test_seconds: float = 0.0


def _generate(settings: Settings, batch: int, seqlen: int, rng: np.random.Generator):
    if settings.task == "selective-copying":
        return tasks.selective_copying(batch, seqlen, settings.n_memorize, seed=rng)
    return tasks.induction_heads(batch, seqlen, seed=rng)


def _loss_and_correct(model, inputs, targets):
    """Cross-entropy and number of correct answers, at the answer positions (the last ones)."""
    torch = _torch()
    answers = targets.shape[1]
    logits = model(inputs)[:, -answers:, :]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return loss, (logits.argmax(-1) == targets).sum()


def evaluate(model, data: list[tuple[Any, Any]]) -> float:
    """Accuracy over the answer tokens of ``data``, a list of (inputs, targets) batches."""
    torch = _torch()
    correct, total = 0, 0
    with torch.no_grad():
        for inputs, targets in data:
            correct += int(_loss_and_correct(model, inputs, targets)[1])
            total += targets.numel()
    return correct / total


def _eval_set(settings: Settings, seqlen: int, samples: int, stream: int) -> list[tuple[Any, Any]]:
    """A fixed set of ``samples`` sequences, in batches of at most ``max_eval_tokens`` tokens."""
    rng = np.random.default_rng([settings.seed, stream, seqlen])
    per_batch = max(1, min(samples, settings.max_eval_tokens // seqlen))
    return [_generate(settings, min(per_batch, samples - i), seqlen, rng) for i in range(0, samples, per_batch)]


def _lr_at(step: int, settings: Settings, elapsed: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak.

    The decay runs over ``settings.steps``, or over ``settings.time_limit`` seconds of
    training (``elapsed``) when that ends first, so a run cut by its time limit still
    ends with a decayed learning rate whatever the step rate of the machine.
    """
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    if settings.time_limit > 0:
        progress = max(progress, elapsed / settings.time_limit)
    progress = min(progress, 1.0)
    return settings.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_layer(settings: Settings, layer: str, on_step: Callable[[int, float | None, float | None], None]) -> Result:
    """Train one model with ``layer`` on the task; evaluate it along the way and at the end.

    ``on_step(step, loss, accuracy)`` is called after every step (loss and accuracy are
    None except at logging and evaluation steps, so the device is not synchronised every step).
    """
    torch = _torch()
    result = Result(layer)
    model = make_model(layer, d_model=settings.d_model, n_layers=settings.n_layers, d_state=settings.d_state, seed=settings.seed)
    no_decay = ("A_log", "D", "dt_bias", "bias", "B", "C")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.endswith(no_decay)]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not n.endswith(no_decay))]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=settings.lr,
    )
    validation = _eval_set(settings, settings.seqlen, settings.eval_samples, stream=1)
    rng = np.random.default_rng([settings.seed, 0])
    eval_every = settings.eval_every or max(1, settings.steps // 20)
    log_every = math.gcd(eval_every, 50)  # at most every 50 steps, and at every evaluation
    running, count = None, 0
    start = time.perf_counter()
    deadline = start + settings.time_limit if settings.time_limit > 0 else math.inf
    for step in range(1, settings.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step - 1, settings, time.perf_counter() - start)
        inputs, targets = _generate(settings, settings.batch, settings.seqlen, rng)
        loss, _ = _loss_and_correct(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.detach() if running is None else running + loss.detach()
        count += 1
        shown_loss = shown_acc = None
        last = step == settings.steps or time.perf_counter() > deadline
        if step % log_every == 0 or last:
            shown_loss = float(running) / count  # the one synchronisation per log_every steps
            running, count = None, 0
        if step % eval_every == 0 or last:
            model.eval()
            shown_acc = evaluate(model, validation)
            model.train()
            result.steps.append(step)
            result.val_accuracy.append(shown_acc)
            result.train_loss.append(shown_loss if shown_loss is not None else float("nan"))
        on_step(step, shown_loss, shown_acc)
        result.steps_done = step
        if last or (settings.stop_at > 0 and shown_acc is not None and shown_acc >= settings.stop_at):
            break
    result.train_seconds = time.perf_counter() - start
    result.accuracy = result.val_accuracy[-1]
    start = time.perf_counter()
    model.eval()
    for length in settings.test_lengths:
        result.test_accuracy[length] = evaluate(model, _eval_set(settings, length, settings.test_samples, stream=2))
    result.test_seconds = time.perf_counter() - start
    return result


def run(settings: Settings, console: Any = None) -> list[Result]:
    """Train every layer of ``settings.layers`` with a progress bar; returns their results."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    device = settings.resolved_device()
    threads = settings.threads or (1 if device == "cpu" else 0)
    if threads:
        _torch().set_num_threads(threads)
    results = []
    with use_backend("torch", device=device):
        columns = (
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TimeRemainingColumn(),
        )
        with Progress(*columns, console=console) as progress:
            for layer in settings.layers:
                bar = progress.add_task(f"{LAYER_NAMES[layer]:>20}", total=settings.steps, stats="")
                shown = {"loss": float("nan"), "acc": float("nan")}

                def on_step(step: int, loss: float | None, acc: float | None, bar=bar, shown=shown, layer=layer) -> None:
                    shown["loss"] = shown["loss"] if loss is None else loss
                    shown["acc"] = shown["acc"] if acc is None else acc
                    stats = f"loss {shown['loss']:.3f}  val acc {100 * shown['acc']:.1f}%"
                    progress.update(bar, completed=step, stats=stats)
                    if acc is not None and not progress.console.is_terminal:  # logs get a line per evaluation
                        progress.console.print(f"{LAYER_NAMES[layer]} step {step}/{settings.steps}: {stats}")

                results.append(train_layer(settings, layer, on_step))
    return results


# ----------------------------------------------------------------------------- report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _length(n: int) -> str:
    for power, suffix in ((20, "M"), (10, "K")):
        if n >= 1 << power and n % (1 << power) == 0:
            return f"{n >> power}{suffix}"
    return str(n)


def _title(settings: Settings) -> str:
    task = settings.task
    if task == "selective-copying":
        task += f" ({settings.n_memorize} tokens to memorise)"
    budget = f"up to {settings.steps} steps"
    if settings.time_limit > 0:
        budget += f" or {settings.time_limit:g} s"
    return (
        f"{task}: trained at seqlen {settings.seqlen}, {budget} of batch {settings.batch}, "
        f"lr {settings.lr:g}, weight decay {settings.weight_decay:g}, seed {settings.seed}, "
        f"device {settings.resolved_device()}"
    )


def _rows(settings: Settings, results: Sequence[Result]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the paper-style table: model, layer, accuracy, one column per test length."""
    header = ["model", "layer", f"accuracy @ {_length(settings.seqlen)}"]
    header += [f"test @ {_length(n)}" for n in settings.test_lengths]
    header += ["paper", "steps", "train s"]
    rows = [
        [
            "Mamba", LAYER_NAMES[r.layer], _pct(r.accuracy), *(_pct(r.test_accuracy[n]) for n in settings.test_lengths),
            PAPER[settings.task][r.layer], str(r.steps_done), f"{r.train_seconds:.0f}",
        ]
        for r in results
    ]
    return header, rows


def table(settings: Settings, results: Sequence[Result]) -> Any:
    """The paper-style table, for the terminal (rich)."""
    from rich.table import Table

    header, rows = _rows(settings, results)
    out = Table(title=_title(settings))
    for i, column in enumerate(header):
        out.add_column(column, justify="left" if i < 2 else "right")
    for row in rows:
        out.add_row(*row)
    return out


def markdown_table(settings: Settings, results: Sequence[Result]) -> str:
    """The paper-style table, as Markdown (for docs/reproduction.md)."""
    header, rows = _rows(settings, results)
    lines = [f"{_title(settings)}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(settings: Settings, results: Sequence[Result], path: Path) -> None:
    """Accuracy over training steps, one line per layer (and accuracy against test length, when tested)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    panels = 2 if settings.test_lengths else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0, 0]
    for r in results:
        ax.plot(r.steps, [100 * a for a in r.val_accuracy], marker=".", label=f"Mamba, {LAYER_NAMES[r.layer]}")
    ax.set(xlabel="training step", ylabel="validation accuracy (%)", ylim=(0, 101), title=f"{settings.task}, seqlen {settings.seqlen}")
    ax.grid(alpha=0.3)
    ax.legend()
    if settings.test_lengths:
        ax = axes[0, 1]
        for r in results:
            lengths = sorted(r.test_accuracy)
            ax.plot(lengths, [100 * r.test_accuracy[n] for n in lengths], marker="o", label=LAYER_NAMES[r.layer])
        ax.axvline(settings.seqlen, color="grey", linestyle=":", label="training length")
        ax.set(xscale="log", xlabel="test sequence length", ylabel="accuracy (%)", ylim=(0, 101), title="extrapolation")
        ticks = sorted({*settings.test_lengths, settings.seqlen})
        ax.set_xticks(ticks, [_length(n) for n in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # the log axis's own labels collide with ours
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- command

#: defaults per task: sized for an H100 within a few minutes (see docs/reproduction.md)
DEFAULTS = {
    "selective-copying": {
        "seqlen": 256, "steps": 20000, "batch": 64, "lr": 3e-3, "warmup": 200, "eval_every": 500, "test_lengths": (),
        "weight_decay": 0.1,
    },
    "induction-heads": {
        "seqlen": 256, "steps": 6000, "batch": 32, "lr": 2e-3, "warmup": 100, "eval_every": 250,
        "test_lengths": (256, 1024, 4096, 16384, 65536),
        # no weight decay: it pulls the selective Δ toward its bias, against the Δ ≈ 0 on
        # irrelevant tokens that holding the key over long gaps needs (CPU runs: 66% at
        # 16x the training length with 0.1, 91% without)
        "weight_decay": 0.0,
    },
}


def cmd_reproduce(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # logs: keep the table's rows on one line each
    defaults = DEFAULTS[args.task]
    settings = Settings(
        task=args.task,
        seqlen=args.seqlen or defaults["seqlen"],
        steps=args.steps or defaults["steps"],
        batch=args.batch or defaults["batch"],
        lr=args.lr or defaults["lr"],
        seed=args.seed,
        device=args.device,
        layers=tuple(args.layers),
        weight_decay=args.weight_decay if args.weight_decay is not None else defaults["weight_decay"],
        warmup=args.warmup if args.warmup is not None else defaults["warmup"],
        eval_every=args.eval_every or defaults["eval_every"],
        eval_samples=args.eval_samples,
        test_lengths=tuple(args.test_lengths if args.test_lengths is not None else defaults["test_lengths"]),
        test_samples=args.test_samples,
        n_memorize=args.memorize,
        threads=args.threads or 0,
        time_limit=args.time_limit,
        stop_at=args.stop_at,
    )
    console.print(f"[bold]{args.task}[/bold] on the torch backend, device {settings.resolved_device()}")
    results = run(settings, console)
    console.print(table(settings, results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.task}-seqlen{settings.seqlen}-seed{settings.seed}"
    if settings.layers != LAYERS:  # runs of one layer each must not overwrite each other
        stem += "-" + "-".join(settings.layers)
    record = {"settings": asdict(settings), "results": [asdict(r) for r in results]}
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    (out / f"{stem}.md").write_text(markdown_table(settings, results))
    try:
        plot(settings, results, out / f"{stem}.png")
        console.print(f"saved {out / stem}.png, .json and .md")
    except ImportError:
        console.print(f"saved {out / stem}.json and .md; no plot: matplotlib is not installed (pip install matplotlib)")
    return 0


def add_reproduce_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``reproduce {selective-copying, induction-heads}`` to the ``python -m portassm`` parser."""
    parser = subparsers.add_parser(
        "reproduce",
        help="train a small Mamba with the selective S6 layer and with a time-invariant one on a synthetic task",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("task", choices=list(tasks.TASKS), help="the synthetic task of the paper")
    parser.add_argument("--seqlen", type=int, help="training sequence length (default 256)")
    parser.add_argument("--steps", type=int, help="training steps (default: 20000 selective copying, 6000 induction heads)")
    parser.add_argument("--batch", type=int, help="sequences per step (default: 64 selective copying, 32 induction heads)")
    parser.add_argument(
        "--lr", type=float, help="peak AdamW learning rate, cosine-decayed to a tenth (default: 3e-3 copying, 2e-3 induction)"
    )
    parser.add_argument(
        "--weight-decay", type=float,
        help="AdamW weight decay of the projection, convolution and embedding matrices (default: 0.1 copying, 0 induction)",
    )
    parser.add_argument("--warmup", type=int, help="linear warm-up steps (default: 200 copying, 100 induction)")
    parser.add_argument(
        "--memorize", type=int, default=tasks.N_MEMORIZE, help="selective copying: tokens to memorise (default 16)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the model, the training data and the test sets")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument(
        "--threads", type=int,
        help="torch CPU threads (default 1 on --device cpu: the ops are tiny and a Python loop over time runs them)",
    )
    parser.add_argument("--layers", nargs="+", choices=LAYERS, default=list(LAYERS), help="which layers to train")
    parser.add_argument(
        "--eval-every", type=int, help="steps between validation points (default: 500 copying, 250 induction)"
    )
    parser.add_argument("--eval-samples", type=int, default=512, help="validation sequences at the training length")
    parser.add_argument(
        "--test-lengths", type=int, nargs="*",
        help="lengths to test at after training (default: 256 1024 4096 16384 65536 for induction heads)",
    )
    parser.add_argument("--test-samples", type=int, default=256, help="test sequences per test length")
    parser.add_argument(
        "--time-limit", type=float, default=0.0, help="stop a layer's training after this many seconds; the learning rate decays over it (0: no limit)"
    )
    parser.add_argument(
        "--stop-at", type=float, default=0.0,
        help="stop a layer's training once validation accuracy reaches this fraction, e.g. 0.995 (0: never)",
    )
    parser.add_argument("--out", default="reproduce-out", help="folder for the plot (PNG) and the measurements (JSON)")
    parser.set_defaults(run=cmd_reproduce)
    return parser
