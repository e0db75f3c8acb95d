"""A Mamba language model on every backend: load released checkpoints, score and generate.

:class:`MambaLM` is the architecture of the released Mamba language models (mamba_ssm's
``MambaLMHeadModel``, transformers' ``MambaForCausalLM``)::

    h = embedding[input_ids]                                 # (batch, seqlen, d_model)
    for each of the n_layer layers:
        h = h + mamba_block(rms_norm(h) * norm.weight)       # residual stream in float32
    logits = (rms_norm(h) * norm_f.weight) @ embedding.T     # head tied to the embedding

with ``rms_norm(h) = h / sqrt(mean(h**2) + eps)``. The blocks are :func:`portassm.mamba_block`
and :func:`portassm.mamba_block_step`, so the model runs on whichever backend holds its
weights. Decoding carries one ``(conv_state, ssm_state)`` pair per layer: memory per
generated token is constant, whatever the length of the text.

Checkpoints load from a local directory in both public layouts, without torch:

* ``"hf"``: transformers' Mamba format: ``config.json`` (``hidden_size``,
  ``num_hidden_layers``, ``state_size`` ...) and ``model.safetensors`` (or shards listed by
  ``model.safetensors.index.json``) with ``backbone.embeddings.weight``,
  ``backbone.layers.N.norm.weight``, ``backbone.layers.N.mixer.*``, ``backbone.norm_f.weight``.
* ``"mamba_ssm"``: ``config.json`` with ``d_model``, ``n_layer``, ``vocab_size``,
  ``ssm_cfg``, ``pad_vocab_size_multiple`` and the same tensors with
  ``backbone.embedding.weight`` (and ``lm_head.weight``, a copy of it when tied), in
  ``model.safetensors``, or in ``pytorch_model.bin`` when torch is installed to read it.

Every tensor is checked against the shapes the config implies before anything is
converted, and all the problems are reported in one :class:`CheckpointError`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from . import block, checks, ops
from .backend import Backend, get_backend, use_backend

Array = Any
Cache = list  # one (conv_state, ssm_state) per layer, oldest layer first

LAYOUTS = ("hf", "mamba_ssm")

#: the released Mamba language models (d_model, n_layer); vocabulary 50277 padded to 50280
PRESETS: dict[str, tuple[int, int]] = {
    "130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "1.4b": (2048, 48), "2.8b": (2560, 64),
}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: every missing, misshapen or unexpected tensor is named."""


@dataclass(frozen=True)
class MambaConfig:
    """The sizes of a Mamba language model.

    ``vocab_size`` is the number of rows of the embedding, after any padding (mamba_ssm
    pads 50277 to 50280). ``dt_rank`` "auto" is ceil(d_model / 16).
    """

    d_model: int
    n_layer: int
    vocab_size: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    conv_bias: bool = True
    bias: bool = False
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        rank = math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)
        object.__setattr__(self, "dt_rank", rank)
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "dt_rank"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"config {name} must be a positive integer, got {value!r}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "MambaConfig":
        """A released size by name ("130m", "370m", "790m", "1.4b", "2.8b"), vocabulary 50280."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        d_model, n_layer = PRESETS[name]
        return cls(**{"d_model": d_model, "n_layer": n_layer, "vocab_size": 50280, **overrides})

    # -- config.json in the two layouts ---------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "MambaConfig":
        """From transformers' ``MambaConfig`` (``config.json`` with ``hidden_size`` ...)."""
        model_type = cfg.get("model_type", "mamba")
        if model_type != "mamba":
            raise CheckpointError(f"config.json has model_type {model_type!r}; only 'mamba' (Mamba-1) models load")
        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
            raise CheckpointError(f"config.json has hidden_act {cfg['hidden_act']!r}; the Mamba block uses silu")
        known = {
            "hidden_size": "d_model", "num_hidden_layers": "n_layer", "vocab_size": "vocab_size",
            "state_size": "d_state", "conv_kernel": "d_conv", "expand": "expand", "time_step_rank": "dt_rank",
            "use_conv_bias": "conv_bias", "use_bias": "bias", "layer_norm_epsilon": "norm_eps",
            "tie_word_embeddings": "tie_embeddings", "eos_token_id": "eos_token_id",
        }
        _require(cfg, ("hidden_size", "num_hidden_layers", "vocab_size"), "transformers' Mamba")
        return cls(**{ours: cfg[theirs] for theirs, ours in known.items() if cfg.get(theirs) is not None})

    @classmethod
    def from_mamba_ssm(cls, cfg: Mapping[str, Any]) -> "MambaConfig":
        """From mamba_ssm's ``MambaConfig`` (``config.json`` with ``d_model``, ``n_layer``, ``ssm_cfg`` ...)."""
        _require(cfg, ("d_model", "n_layer", "vocab_size"), "mamba_ssm")
        ssm = dict(cfg.get("ssm_cfg") or {})
        if ssm.get("layer", "Mamba1") != "Mamba1":
            raise CheckpointError(f"config.json has ssm_cfg layer {ssm['layer']!r}; only Mamba1 models load")
        if cfg.get("d_intermediate", 0) or cfg.get("attn_layer_idx"):
            raise CheckpointError("config.json asks for MLP or attention layers (d_intermediate, attn_layer_idx); "
                                  "only pure Mamba models load")
        if not cfg.get("rms_norm", True):
            raise CheckpointError("config.json has rms_norm false (LayerNorm); only RMSNorm models load")
        unknown = set(ssm) - {"d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias", "layer",
                              "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "use_fast_path"}
        if unknown:
            raise CheckpointError(f"config.json ssm_cfg has options this model does not implement: {sorted(unknown)}")
        multiple = int(cfg.get("pad_vocab_size_multiple", 1) or 1)
        vocab = -(-int(cfg["vocab_size"]) // multiple) * multiple
        sizes = {k: ssm[k] for k in ("d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias") if k in ssm}
        return cls(
            d_model=cfg["d_model"], n_layer=cfg["n_layer"], vocab_size=vocab, **sizes,
            norm_eps=cfg.get("norm_epsilon", 1e-5), tie_embeddings=cfg.get("tie_embeddings", True),
            eos_token_id=cfg.get("eos_token_id"),
        )

    def to_dict(self, layout: str) -> dict[str, Any]:
        """``config.json`` of ``layout`` ("hf" or "mamba_ssm")."""
        _check_layout(layout)
        if layout == "hf":
            out = dict(
                model_type="mamba", architectures=["MambaForCausalLM"], hidden_size=self.d_model,
                num_hidden_layers=self.n_layer, vocab_size=self.vocab_size, state_size=self.d_state,
                conv_kernel=self.d_conv, expand=self.expand, intermediate_size=self.d_inner,
                time_step_rank=self.dt_rank, use_conv_bias=self.conv_bias, use_bias=self.bias,
                layer_norm_epsilon=self.norm_eps, tie_word_embeddings=self.tie_embeddings, hidden_act="silu",
                residual_in_fp32=True,
            )
        else:
            out = dict(
                d_model=self.d_model, n_layer=self.n_layer, vocab_size=self.vocab_size,
                ssm_cfg=dict(d_state=self.d_state, d_conv=self.d_conv, expand=self.expand, dt_rank=self.dt_rank,
                             conv_bias=self.conv_bias, bias=self.bias),
                rms_norm=True, residual_in_fp32=True, norm_epsilon=self.norm_eps,
                tie_embeddings=self.tie_embeddings, pad_vocab_size_multiple=1,
            )
        if self.eos_token_id is not None:
            out["eos_token_id"] = self.eos_token_id
        return out

    # -- the tensors a checkpoint must hold -------------------------------------------------------

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the model and its shape, under mamba_ssm's names (the canonical ones here)."""
        d, di, n, r = self.d_model, self.d_inner, self.d_state, self.dt_rank
        out: dict[str, tuple[int, ...]] = {"backbone.embedding.weight": (self.vocab_size, d)}
        mixer = {
            "in_proj.weight": (2 * di, d), "conv1d.weight": (di, 1, self.d_conv), "x_proj.weight": (r + 2 * n, di),
            "dt_proj.weight": (di, r), "dt_proj.bias": (di,), "A_log": (di, n), "D": (di,), "out_proj.weight": (d, di),
        }
        if self.conv_bias:
            mixer["conv1d.bias"] = (di,)
        if self.bias:
            mixer.update({"in_proj.bias": (2 * di,), "out_proj.bias": (d,)})
        for i in range(self.n_layer):
            out[f"backbone.layers.{i}.norm.weight"] = (d,)
            out.update({f"backbone.layers.{i}.mixer.{k}": s for k, s in mixer.items()})
        out["backbone.norm_f.weight"] = (d,)
        if not self.tie_embeddings:
            out["lm_head.weight"] = (self.vocab_size, d)
        return out


def _require(cfg: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise CheckpointError(f"config.json of the {what} layout lacks {', '.join(missing)}")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def _file_name(key: str, layout: str) -> str:
    """A canonical tensor name as the layout's files spell it."""
    if layout == "hf" and key == "backbone.embedding.weight":
        return "backbone.embeddings.weight"
    return key


def _canonical_name(key: str, layout: str) -> str:
    if layout == "hf" and key == "backbone.embeddings.weight":
        return "backbone.embedding.weight"
    return key


# ---------------------------------------------------------------------------------------- loading


def detect_layout(cfg: Mapping[str, Any]) -> str:
    """"hf" for transformers' config.json (``hidden_size``), "mamba_ssm" for mamba_ssm's (``d_model``)."""
    if "hidden_size" in cfg or cfg.get("model_type") is not None:
        return "hf"
    if "d_model" in cfg:
        return "mamba_ssm"
    raise CheckpointError("config.json is neither transformers' Mamba config (hidden_size, num_hidden_layers ...) "
                          "nor mamba_ssm's (d_model, n_layer ...)")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise ImportError("reading model.safetensors needs the safetensors package: pip install 'portassm[models]'") from None
    try:
        tensors = load_file(str(path))
    except TypeError:  # bfloat16 has no NumPy type: widen it ourselves
        return _read_safetensors_widening(path)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    # with ml_dtypes imported, NumPy reads bfloat16 itself: widen it the same way
    return {k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in tensors.items()}


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def _read_safetensors_widening(path: Path) -> dict[str, np.ndarray]:
    """Read a safetensors file by its header (8-byte length, JSON, raw bytes), bfloat16 widened to float32.

    A bfloat16 is the upper half of a float32, so shifting its 16 bits up is exact.
    """
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = (8 + size + offset for offset in info["data_offsets"])
        if info["dtype"] == "BF16":
            bits = np.frombuffer(data, dtype="<u2", count=(end - start) // 2, offset=start)
            out[name] = (bits.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
        elif info["dtype"] in _SAFETENSORS_DTYPES:
            dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
            out[name] = np.frombuffer(data, dtype=dtype, count=(end - start) // dtype.itemsize, offset=start).reshape(
                info["shape"]
            ).copy()
        else:
            raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}, which this loader does not read")
    return out


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path.name} is a torch pickle, which needs torch to read; install torch, or convert the "
            "checkpoint to model.safetensors"
        ) from None
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy() for k, v in state.items()}


def read_checkpoint(path: str | os.PathLike) -> tuple[MambaConfig, dict[str, np.ndarray], str]:
    """Read and check a checkpoint directory; nothing is converted to a backend yet.

    Returns
    -------
    config : MambaConfig
    weights : dict of numpy arrays under the canonical (mamba_ssm) names, checked against ``config.shapes()``
    layout : "hf" or "mamba_ssm"

    Raises
    ------
    FileNotFoundError
        No directory, no config.json, or no weights file.
    CheckpointError
        A config this model does not implement, or tensors that do not match it (all named).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    config_path = root / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{root} has no config.json")
    raw = json.loads(config_path.read_text())
    layout = detect_layout(raw)
    config = MambaConfig.from_hf(raw) if layout == "hf" else MambaConfig.from_mamba_ssm(raw)

    index = root / "model.safetensors.index.json"
    if (root / "model.safetensors").is_file():
        tensors = _read_safetensors(root / "model.safetensors")
        source = str(root / "model.safetensors")
    elif index.is_file():
        tensors = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            tensors.update(_read_safetensors(root / shard))
        source = str(index)
    elif (root / "pytorch_model.bin").is_file():
        tensors = _read_torch_bin(root / "pytorch_model.bin")
        source = str(root / "pytorch_model.bin")
    else:
        raise FileNotFoundError(f"{root} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    weights = {_canonical_name(k, layout): v for k, v in tensors.items()}
    check_weights(config, weights, layout, source)
    return config, weights, layout


def check_weights(config: MambaConfig, weights: Mapping[str, Any], layout: str = "mamba_ssm", source: str = "weights") -> None:
    """Check every tensor against ``config.shapes()``; one :class:`CheckpointError` names all problems.

    ``weights`` is keyed by the canonical (mamba_ssm) names; messages use ``layout``'s names.
    A tied model may carry ``lm_head.weight`` (mamba_ssm's files do) when it has the
    embedding's shape; it is not used.
    """
    expected = config.shapes()
    problems = []
    for key, shape in expected.items():
        if key not in weights:
            problems.append(f"missing {_file_name(key, layout)} (expected shape {shape})")
            continue
        got = tuple(int(s) for s in weights[key].shape)
        if got != shape:
            problems.append(f"{_file_name(key, layout)} has shape {got}, expected {shape}")
        elif checks.dtype_name(weights[key]) not in checks.FLOAT_DTYPES:
            problems.append(f"{_file_name(key, layout)} has dtype {checks.dtype_name(weights[key])}, expected floating")
    tolerated = {"lm_head.weight": expected["backbone.embedding.weight"]} if config.tie_embeddings else {}
    for key in weights:
        if key in expected:
            continue
        if key in tolerated and tuple(weights[key].shape) == tolerated[key]:
            continue
        problems.append(f"unexpected tensor {_file_name(key, layout)} of shape {tuple(weights[key].shape)}")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointError(
            f"{source} does not match its config (d_model {config.d_model}, n_layer {config.n_layer}, "
            f"vocab_size {config.vocab_size}, d_state {config.d_state}): " + "; ".join(shown)
        )


# ------------------------------------------------------------------------------------------ model


def _resolve(backend: str | Backend | None) -> Backend:
    if backend is None:
        return get_backend()
    if isinstance(backend, Backend):
        return backend
    with use_backend(backend) as chosen:
        return chosen


#: the weights that multiply activations as ``x @ W.T`` (the tied embedding is the head)
_MATRICES = ("in_proj.weight", "x_proj.weight", "dt_proj.weight", "out_proj.weight", "embedding.weight", "lm_head.weight")


def _cast(xp: Any, x: Array, dtype: Any) -> Array:
    return x if x.dtype == dtype else xp.astype(x, dtype)


def _rms_norm(xp: Any, h: Array, weight: Array, eps: float) -> Array:
    """``h / sqrt(mean(h**2) + eps)`` in h's (float32 or float64) precision, then cast and scaled by weight."""
    scale = 1.0 / xp.sqrt(xp.vecdot(h, h)[..., None] / h.shape[-1] + eps)  # vecdot: a third of mean's time
    return _cast(xp, h * scale, weight.dtype) * weight


class MambaLM:
    """A Mamba language model whose weights live on one backend.

    Build one with :meth:`from_pretrained` (a checkpoint directory), :meth:`random` (fresh
    weights, for benchmarks) or the constructor (a mapping of arrays under mamba_ssm's
    names, as :meth:`state_dict` returns). Its methods run on the backend the weights were
    put on, whatever backend is in force at the call.

    Parameters
    ----------
    config : MambaConfig
    weights : mapping of str to array
        Every tensor of ``config.shapes()``, keyed by mamba_ssm's names; checked first.
    backend : str or Backend, optional
        Where the weights go; the backend in force by default.
    dtype : str
        "float32" (default) or "float64"; "float16" and "bfloat16" on backends whose
        arrays have them. The residual stream stays in float32 (float64 for float64).

    Attributes
    ----------
    config, backend, dtype
    embedding : array, (vocab_size, d_model)
    layers : list of dict
        Per layer, the block parameters keyed as :func:`portassm.mamba_block` takes them.
    norms : list of array, (d_model,) each
    norm_f : array, (d_model,)
    lm_head : array, (vocab_size, d_model); the embedding itself when tied
    cuda_graph : bool
        Decode with a CUDA graph of the whole step when the weights are on a CUDA GPU
        (torch tensors, or cupy arrays in float32 or float64, whose step runs the kernels
        of ``backends/cupy_decode.py``): default True. ``generate`` and ``stream`` take it
        per call.
    row_panels : bool
        On the numba backend in float32, decode batches of 2 to 16 sequences with the
        weights packed for :mod:`portassm.backends.numba_gemm` (packed on the first such
        step; as much memory again as the matrices): default True. False keeps NumPy's
        (BLAS) matrix products.

    Treat the weight attributes as read-only: the decoding path keeps values derived
    from them at construction (``-exp(A_log)``, transposed views) and captures CUDA
    graphs that read them.
    """

    def __init__(
        self,
        config: MambaConfig,
        weights: Mapping[str, Array],
        *,
        backend: str | Backend | None = None,
        dtype: str = "float32",
    ) -> None:
        check_weights(config, weights)
        self.config = config
        self.backend = _resolve(backend)
        self.dtype = dtype
        with self._on_backend() as xp:
            target = getattr(xp, dtype, None)
            if dtype not in checks.FLOAT_DTYPES or target is None:
                raise ValueError(f"dtype must be one of {', '.join(checks.FLOAT_DTYPES)} that {self.backend.name} "
                                 f"arrays have, got {dtype!r}")
            self._residual_dtype = xp.float64 if dtype == "float64" else xp.float32

            # On the host, x @ W.T runs faster (by a quarter at batch 1, a third at batch 8, with
            # OpenBLAS) when W.T is contiguous: keep each matrix as the transposed view of a
            # contiguous (in, out) array. Its shape stays (out, in), as the block expects.
            on_host = self._transposed = self.backend.is_native(np.empty(0))

            def put(key: str) -> Array:
                value = weights[key]
                if isinstance(value, np.ndarray) and dtype in ("float32", "float64"):
                    if on_host and key.endswith(_MATRICES):
                        return np.ascontiguousarray(value.T, dtype=dtype).T
                    value = np.ascontiguousarray(value, dtype=dtype)  # convert on the host: one copy to a device
                return _cast(xp, self.backend.asarray(value), target)

            self.embedding = put("backbone.embedding.weight")
            self.layers: list[dict[str, Array]] = []
            self.norms: list[Array] = []
            names = list(config.shapes())
            for i in range(config.n_layer):
                prefix = f"backbone.layers.{i}.mixer."
                self.layers.append({k[len(prefix):]: put(k) for k in names if k.startswith(prefix)})
                self.norms.append(put(f"backbone.layers.{i}.norm.weight"))
            self.norm_f = put("backbone.norm_f.weight")
            self.lm_head = self.embedding if config.tie_embeddings else put("lm_head.weight")
            self._steps = [_LayerStep(xp, params, norm) for params, norm in zip(self.layers, self.norms)]
        self.cuda_graph = True
        self.row_panels = True
        self._panels: _RowPanels | None = None  # packed on the first step that uses them
        self._graphs: dict[int, Any] = {}  # batch -> captured decoding step (None: capture failed)
        # cupy: the decoding step in the kernels of backends/cuda_model/decode.cu (capturable in a graph)
        self._decoder = None
        if self.backend.name == "cupy":
            from .backends import cupy_decode

            if cupy_decode.unsupported(config, dtype) is None:
                self._decoder = cupy_decode.Decoder(self)

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, backend: str | Backend | None = None, dtype: str = "float32"
    ) -> "MambaLM":
        """Load a checkpoint directory in the "hf" or the "mamba_ssm" layout (see the module docstring).

        Every tensor is checked before any is converted, so a bad checkpoint raises
        :class:`CheckpointError` (naming each missing, misshapen or unexpected tensor)
        and nothing is loaded.
        """
        config, weights, _ = read_checkpoint(path)
        return cls(config, weights, backend=backend, dtype=dtype)

    @classmethod
    def random(
        cls, config: MambaConfig, seed: int | None = None, *, backend: str | Backend | None = None,
        dtype: str = "float32",
    ) -> "MambaLM":
        """Fresh weights initialised as mamba_ssm initialises them (for benchmarks and tests).

        Blocks by :func:`portassm.init_block_params`; the embedding normal with std 0.02;
        norm weights 1; out_proj rescaled by 1/sqrt(n_layer) as mamba_ssm's
        ``rescale_prenorm_residual`` does, so the residual stream stays of order one.
        """
        rng = np.random.default_rng(seed)
        weights: dict[str, np.ndarray] = {
            "backbone.embedding.weight": rng.normal(0.0, 0.02, (config.vocab_size, config.d_model)).astype(np.float32),
            "backbone.norm_f.weight": np.ones(config.d_model, np.float32),
        }
        with use_backend("numpy"):
            for i in range(config.n_layer):
                params = block.init_block_params(
                    config.d_model, config.d_state, config.d_conv, config.expand, config.dt_rank,
                    conv_bias=config.conv_bias, bias=config.bias, seed=int(rng.integers(2**63)),
                )
                params["out_proj.weight"] = params["out_proj.weight"] / np.float32(math.sqrt(config.n_layer))
                weights.update({f"backbone.layers.{i}.mixer.{k}": v for k, v in params.items()})
                weights[f"backbone.layers.{i}.norm.weight"] = np.ones(config.d_model, np.float32)
        if not config.tie_embeddings:
            weights["lm_head.weight"] = rng.normal(0.0, 0.02, (config.vocab_size, config.d_model)).astype(np.float32)
        return cls(config, weights, backend=backend, dtype=dtype)

    def state_dict(self, layout: str = "mamba_ssm") -> dict[str, np.ndarray]:
        """Every tensor as a NumPy array, under ``layout``'s names (``lm_head.weight`` only when untied)."""
        _check_layout(layout)
        to_numpy = self.backend.to_numpy
        out = {_file_name("backbone.embedding.weight", layout): to_numpy(self.embedding)}
        for i, (params, norm) in enumerate(zip(self.layers, self.norms)):
            out[f"backbone.layers.{i}.norm.weight"] = to_numpy(norm)
            out.update({f"backbone.layers.{i}.mixer.{k}": to_numpy(v) for k, v in params.items()})
        out["backbone.norm_f.weight"] = to_numpy(self.norm_f)
        if not self.config.tie_embeddings:
            out["lm_head.weight"] = to_numpy(self.lm_head)
        return out

    def save_pretrained(self, path: str | os.PathLike, layout: str = "hf") -> None:
        """Write ``config.json`` and ``model.safetensors`` in ``layout``, loadable by :meth:`from_pretrained`
        (and, for "hf", by transformers' ``MambaForCausalLM.from_pretrained``)."""
        from safetensors.numpy import save_file

        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        tensors = {k: np.ascontiguousarray(v) for k, v in self.state_dict(layout).items()}
        save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
        (root / "config.json").write_text(json.dumps(self.config.to_dict(layout), indent=2) + "\n")

    def __repr__(self) -> str:
        c = self.config
        return (f"MambaLM(d_model={c.d_model}, n_layer={c.n_layer}, vocab_size={c.vocab_size}, d_state={c.d_state}, "
                f"backend={self.backend.name!r}, dtype={self.dtype!r})")

    # -- running -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _on_backend(self) -> Iterator[Any]:
        """Run on the weights' backend, whatever is in force outside."""
        if get_backend().name == self.backend.name:
            yield self.backend.namespace()
        else:
            with use_backend(self.backend.name) as chosen:
                yield chosen.namespace()

    def _embed(self, xp: Any, ids: np.ndarray) -> Array:
        """(batch, seqlen) ids -> (batch, seqlen, d_model) rows of the embedding, in the residual dtype."""
        flat = self.backend.asarray(np.ascontiguousarray(ids.reshape(-1)))
        return xp.reshape(self._embed_flat(xp, flat), (*ids.shape, self.config.d_model))

    def _embed_flat(self, xp: Any, flat: Array) -> Array:
        """(n,) ids, an array of the backend -> (n, d_model) rows of the embedding, in the residual dtype."""
        if self._transposed:  # gather columns of the contiguous (d_model, vocab) array: take() on the
            # transposed view would first copy all of it
            rows = xp.matrix_transpose(xp.take(xp.matrix_transpose(self.embedding), flat, axis=1))
        else:
            rows = xp.take(self.embedding, flat, axis=0)
        return _cast(xp, rows, self._residual_dtype)

    def _head(self, xp: Any, h: Array, rows: _RowPanels | None = None) -> Array:
        """Logits from the residual stream; through the packed head when ``rows`` is given (decoding)."""
        x = _rms_norm(xp, h, self.norm_f, self.config.norm_eps)
        if rows is None:
            logits = xp.matmul(x, xp.matrix_transpose(self.lm_head))
        else:
            logits = rows.matmul(x, rows.head)
        return _cast(xp, logits, self._residual_dtype)

    def forward(
        self,
        input_ids: Any,
        *,
        cache: Cache | None = None,
        return_cache: bool = False,
        last_only: bool = False,
    ) -> Array | tuple[Array, Cache]:
        """Logits for every position of a whole prompt.

        Parameters
        ----------
        input_ids : int array-like, (batch, seqlen) or (seqlen,)
        cache : list of (conv_state, ssm_state), optional
            Continue from the state of an earlier :meth:`forward` or :meth:`step` (chunked prefill).
        return_cache : bool
            Also return the cache after the last token, to continue with :meth:`step`.
        last_only : bool
            Compute the logits of the last position only (what generation needs).

        Returns
        -------
        logits : array of the backend, (batch, seqlen, vocab_size) or (batch, 1, vocab_size)
            with ``last_only``; float32 (float64 for a float64 model). A 1-D prompt gives
            logits without the batch axis.
        cache : list of (conv_state, ssm_state), one per layer, only with ``return_cache``
        """
        ids, squeeze = self._check_ids(input_ids)
        if cache is not None:
            self._check_cache(cache, ids.shape[0])
        with self._on_backend() as xp:
            h = self._embed(xp, ids)
            new_cache: Cache = []
            for i, (params, norm) in enumerate(zip(self.layers, self.norms)):
                x = _rms_norm(xp, h, norm, self.config.norm_eps)
                out, layer_cache = block.mamba_block(
                    x, params, cache=None if cache is None else cache[i], return_cache=True
                )
                new_cache.append(layer_cache)
                h = h + _cast(xp, out, h.dtype)
            if last_only:
                h = h[:, -1:, :]
            logits = self._head(xp, h)
        if squeeze:
            logits = logits[0]
        return (logits, new_cache) if return_cache else logits

    __call__ = forward

    def init_cache(self, batch: int) -> Cache:
        """An empty cache for :meth:`step`: per layer conv_state (batch, d_inner, d_conv - 1) and
        ssm_state (batch, d_inner, d_state), zeros."""
        with self._on_backend():
            return [block.init_block_cache(params, batch) for params in self.layers]

    def step(self, token_ids: Any, cache: Cache) -> tuple[Array, Cache]:
        """One token per sequence: logits of the next, and the cache advanced by one token.

        Parameters
        ----------
        token_ids : int array-like, (batch,)
        cache : list of (conv_state, ssm_state)
            From :meth:`init_cache`, ``forward(..., return_cache=True)`` or the previous step;
            not modified.

        Returns
        -------
        logits : array of the backend, (batch, vocab_size), float32 (float64 for a float64 model)
        cache : the new cache
        """
        ids = np.asarray(token_ids)
        if ids.ndim != 1:
            raise ValueError(f"token_ids must be 1-dimensional (batch,), got shape {ids.shape}")
        ids = self._check_ids(ids[:, None])[0]
        self._check_cache(cache, ids.shape[0])
        if self._decoder is not None:
            return self._decoder.step(ids[:, 0], cache)
        with self._on_backend() as xp:
            h = self._embed(xp, ids)[:, 0, :]
            new_cache: Cache = []
            rows = self._row_panels(ids.shape[0])
            h = self._step_layers(xp, h, cache, new_cache, rows)
            return self._head(xp, h, rows), new_cache

    def _row_panels(self, batch: int) -> _RowPanels | None:
        """The weights packed for :mod:`portassm.backends.numba_gemm`, when a step of ``batch``
        rows uses it (numba backend, float32, 2 to 16 rows, ``row_panels`` on); packed on the first
        such step and kept."""
        if not (self.row_panels and self.backend.name == "numba" and self.dtype == "float32" and 2 <= batch <= 16):
            return None
        if self._panels is None:
            self._panels = _RowPanels(self)
        return self._panels

    def _step_layers(
        self, xp: Any, h: Array, cache: Cache, new_cache: Cache | None, rows: _RowPanels | None = None
    ) -> Array:
        """The residual stream after every layer's block step, for one token.

        The block of :func:`portassm.mamba_block_step`, the same operations in the same
        order (the conv in its array-API form on every backend), on parameters prepared
        at construction and without the per-call checks (the shapes are the model's own). With ``new_cache`` a list, the new states are
        appended to it; with None, they are written into ``cache``'s arrays in place (the
        form a CUDA graph captures).
        """
        scan_step = self.backend.module.scan_step
        eps = self.config.norm_eps
        d_inner, d_state, rank = self.config.d_inner, self.config.d_state, self.config.dt_rank
        steps, matmul = (self._steps, xp.matmul) if rows is None else (rows.steps, rows.matmul)
        for layer, (conv_state, ssm_state) in zip(steps, cache):
            x = _rms_norm(xp, h, layer.norm, eps)
            xz = matmul(x, layer.in_w)
            if layer.in_b is not None:
                xz = xz + layer.in_b
            xs, z = xz[:, :d_inner], xz[:, d_inner:]
            # The conv of one token is d_conv multiply-adds a channel: array operations (the
            # array-API form of ops.causal_conv1d_step), also where the backend has a conv
            # kernel, whose thread pool can take longer to wake on a busy host than the sum.
            window = xp.concat([_cast(xp, conv_state, xs.dtype), xs[:, :, None]], axis=-1)
            xs = xp.sum(window * layer.conv_w, axis=-1)
            if layer.conv_b is not None:
                xs = xs + layer.conv_b
            xs, conv_new = ops._silu(xp, xs), window[..., 1:]
            x_dbl = matmul(xs, layer.x_w)
            dt = matmul(x_dbl[:, :rank], layer.dt_w)
            B, C = x_dbl[:, None, rank : rank + d_state], x_dbl[:, None, rank + d_state :]
            y, ssm_new = scan_step(ssm_state, xs, dt, layer.A, B, C, layer.D, z, layer.dt_b, True, "mamba")
            out = matmul(y, layer.out_w)
            if layer.out_b is not None:
                out = out + layer.out_b
            h = h + _cast(xp, out, h.dtype)
            if new_cache is None:
                conv_state[...] = conv_new
                ssm_state[...] = ssm_new
            else:
                new_cache.append((conv_new, ssm_new))
        return h

    def _graph_body(self, xp: Any, ids: Array, cache: Cache) -> Array:
        """One decoding step from device token ids, the cache updated in place: what a CUDA graph holds."""
        if self._decoder is not None:
            return self._decoder.step_in_place(ids, cache)
        h = self._embed_flat(xp, ids)
        rows = self._row_panels(h.shape[0])
        return self._head(xp, self._step_layers(xp, h, cache, None, rows), rows)

    def _check_ids(self, input_ids: Any) -> tuple[np.ndarray, bool]:
        ids = np.asarray(input_ids)
        if ids.dtype.kind not in "iu" and not (ids.dtype.kind == "f" and ids.size == 0):
            raise TypeError(f"input_ids must be integers, got dtype {ids.dtype}")
        if ids.ndim not in (1, 2):
            raise ValueError(f"input_ids must be (batch, seqlen) or (seqlen,), got shape {ids.shape}")
        squeeze = ids.ndim == 1
        ids = ids.astype(np.int64, copy=False).reshape(1, -1) if squeeze else ids.astype(np.int64, copy=False)
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must hold at least one token per sequence, got shape {ids.shape}")
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bad.any():
            raise ValueError(f"token id {int(ids[bad][0])} is outside the vocabulary [0, {self.config.vocab_size})")
        return ids, squeeze

    def _check_cache(self, cache: Cache, batch: int) -> None:
        if len(cache) != self.config.n_layer:
            raise ValueError(f"cache has {len(cache)} layers, the model {self.config.n_layer}")
        if cache[0][1].shape[0] != batch:
            raise ValueError(f"cache is for batch {cache[0][1].shape[0]}, the tokens for batch {batch}")

    # -- generation --------------------------------------------------------------------------------

    def stream(
        self,
        input_ids: Any,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        *,
        eos_token_id: int | None = None,
        cuda_graph: bool | None = None,
    ) -> Iterator[np.ndarray]:
        """Generate token by token: an iterator of the new tokens, (batch,) int64 each, as they come.

        The prompt is read in one :meth:`forward` (prefill), then each token costs one
        :meth:`step`. ``temperature == 0`` picks the most likely token (greedy, on the
        device); otherwise tokens are sampled on the host from softmax(logits /
        temperature), restricted to the ``top_k`` most likely and to the smallest set
        whose probability reaches ``top_p``, with ``numpy.random.default_rng(seed)``.
        With ``eos_token_id``, a sequence that produced it keeps producing it, and the
        iterator stops when every sequence has.

        ``cuda_graph`` (default: the model's ``cuda_graph`` attribute, True) replays the
        whole decoding step as one CUDA graph when the weights are on a CUDA GPU (torch,
        or cupy in float32 or float64): the same kernels on the same data as :meth:`step`, without the
        cost of launching them one by one from Python. The graph is captured at the
        first use for a batch size and reused by later calls. If the capture fails, a
        warning says why and decoding goes on with :meth:`step`.
        """
        _check_sampling(max_new_tokens, temperature, top_k, top_p)
        ids, _ = self._check_ids(input_ids)
        if max_new_tokens == 0:
            return
        rng = np.random.default_rng(seed)
        logits, cache = self.forward(ids, return_cache=True, last_only=True)
        logits = logits[:, 0, :]
        graph = None
        if max_new_tokens > 1 and (self.cuda_graph if cuda_graph is None else cuda_graph):
            graph = self._decoding_graph(ids.shape[0])
        if graph is not None:
            graph.acquire(cache)  # the graph's own cache now holds the state; this one is dropped
            cache = None
        try:
            finished = np.zeros(ids.shape[0], dtype=bool)
            for i in range(max_new_tokens):
                tokens = self._pick(logits, temperature, top_k, top_p, rng)
                if eos_token_id is not None:
                    tokens[finished] = eos_token_id
                    finished |= tokens == eos_token_id
                yield tokens
                if i + 1 == max_new_tokens or finished.all():
                    return
                if graph is not None:
                    logits = graph.step(tokens)  # the graph's logits buffer, read by _pick before the next step
                else:
                    logits, cache = self.step(tokens, cache)
        finally:
            if graph is not None:
                graph.release()

    def _decoding_graph(self, batch: int) -> "_GraphStep | None":
        """The captured decoding step for ``batch`` sequences, or None (not on CUDA, in use, failed)."""
        if _graph_kind(self) is None:
            return None
        if batch not in self._graphs:
            try:
                graph = (_CupyGraphStep if _graph_kind(self) == "cupy" else _TorchGraphStep)(self, batch)
                graph.verify(self)
                self._graphs[batch] = graph
            except Exception as exc:  # noqa: BLE001 - any failure of the capture: decode eagerly instead
                self._graphs[batch] = None
                warnings.warn(
                    f"capturing the decoding step of batch {batch} in a CUDA graph failed ({type(exc).__name__}: "
                    f"{exc}); this model decodes that batch size step by step instead (same results, slower)",
                    RuntimeWarning, stacklevel=3,
                )
        graph = self._graphs[batch]
        return None if graph is None or graph.busy else graph  # a second stream at once decodes step by step

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        *,
        eos_token_id: int | None = None,
        callback: Callable[[np.ndarray], Any] | None = None,
        cuda_graph: bool | None = None,
    ) -> np.ndarray:
        """The prompt followed by up to ``max_new_tokens`` generated tokens.

        Greedy when ``temperature == 0``, sampling otherwise (see :meth:`stream`, which
        takes the same arguments, ``cuda_graph`` included). ``callback`` receives each new
        (batch,) array of tokens as it is produced, for streaming.

        Returns
        -------
        numpy int64 array, (batch, seqlen + new) or (seqlen + new,) for a 1-D prompt
        """
        ids, squeeze = self._check_ids(input_ids)
        new = []
        tokens_iter = self.stream(ids, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id=eos_token_id,
                                  cuda_graph=cuda_graph)
        for tokens in tokens_iter:
            new.append(tokens)
            if callback is not None:
                callback(tokens)
        out = np.concatenate([ids, np.stack(new, axis=1)], axis=1) if new else ids
        return out[0] if squeeze else out

    def _pick(self, logits: Array, temperature: float, top_k: int | None, top_p: float | None, rng) -> np.ndarray:
        if temperature == 0:
            xp = self.backend.namespace()
            return np.asarray(self.backend.to_numpy(xp.argmax(logits, axis=-1)), dtype=np.int64)
        return sample_logits(self.backend.to_numpy(logits), temperature, top_k, top_p, rng)


class _LayerStep:
    """One layer's parameters as the decoding step uses them, prepared once at construction:
    the projections as the (in, out) views that ``x @ W.T`` multiplies by, the conv weight as
    (d_inner, d_conv), and A = -exp(A_log)."""

    __slots__ = ("norm", "in_w", "in_b", "conv_w", "conv_b", "x_w", "dt_w", "dt_b", "A", "D", "out_w", "out_b")

    def __init__(self, xp: Any, params: Mapping[str, Array], norm: Array) -> None:
        t = xp.matrix_transpose
        self.norm = norm
        self.in_w, self.in_b = t(params["in_proj.weight"]), params.get("in_proj.bias")
        self.conv_w, self.conv_b = params["conv1d.weight"][:, 0, :], params.get("conv1d.bias")
        self.x_w, self.dt_w, self.dt_b = t(params["x_proj.weight"]), t(params["dt_proj.weight"]), params["dt_proj.bias"]
        self.A, self.D = -xp.exp(params["A_log"]), params["D"]
        self.out_w, self.out_b = t(params["out_proj.weight"]), params.get("out_proj.bias")


class _RowPanels:
    """A float32 model's matrices packed for the decoding step of a few rows on the CPU
    (:mod:`portassm.backends.numba_gemm`): per layer a copy of its :class:`_LayerStep` whose
    projections are :class:`~portassm.backends.numba_gemm.Panels`, and the head. As much
    memory again as the model's matrices."""

    def __init__(self, model: MambaLM) -> None:
        from .backends import numba_gemm

        self.matmul = numba_gemm.matmul
        self.steps = []
        for step in model._steps:
            packed = _LayerStep.__new__(_LayerStep)
            for name in _LayerStep.__slots__:
                value = getattr(step, name)
                setattr(packed, name, numba_gemm.Panels(value) if name in ("in_w", "x_w", "dt_w", "out_w") else value)
            self.steps.append(packed)
        self.head = numba_gemm.Panels(model.lm_head.T)


def _graph_kind(model: MambaLM) -> str | None:
    """"torch" when the model's weights are torch tensors on a CUDA GPU, "cupy" when they
    are cupy arrays decoded by the kernels of ``backends/cupy_decode.py``, else None.

    The generic cupy step cannot be captured: CuPy refuses cuBLAS calls (its matrix
    products) inside a stream capture ("calling cuBLAS API during stream capture is
    currently unsupported", H100, CuPy 14.2). The decoding kernels call no library.
    """
    if model.backend.name == "torch" and getattr(model.embedding, "is_cuda", False):
        return "torch"
    if model.backend.name == "cupy" and model._decoder is not None:
        return "cupy"
    return None


class _GraphStep:
    """A whole decoding step (embedding, every layer, final norm, head) captured as one CUDA graph.

    It owns static buffers: the token ids (batch,), one (conv_state, ssm_state) pair per
    layer, which each replay reads and overwrites with the next state, and the logits
    (batch, vocab_size), which each replay overwrites. The capture runs the step twice
    first (kernel compilation, library handles, the memory pool), so that nothing in the
    captured step allocates device memory for the first time or waits for the device.
    """

    busy = False

    def acquire(self, cache: Cache) -> None:
        """Start decoding from ``cache`` (copied into the graph's own)."""
        self.busy = True
        for (conv, ssm), (conv_new, ssm_new) in zip(self.cache, cache):
            conv[...] = conv_new
            ssm[...] = ssm_new

    def release(self) -> None:
        self.busy = False

    def verify(self, model: MambaLM) -> None:
        """Check one replay against :meth:`MambaLM.step` from the same state, once after the capture.

        The replay runs the kernels the eager step runs, on the same data: its logits and
        new state must equal the step's up to rounding. A capture that went wrong (a
        buffer freed and reused, an operation left out) is refused here rather than
        giving other tokens later.
        """
        batch = int(self.ids.shape[0])
        vocab = model.config.vocab_size
        first = (np.arange(batch, dtype=np.int64) * 7919 + 1) % vocab
        second = (np.arange(batch, dtype=np.int64) * 104729 + 3) % vocab
        _, cache = model.step(first, model.init_cache(batch))  # a state that is not all zeros
        logits, new_cache = model.step(second, cache)
        self.acquire(cache)
        try:
            replayed = self.step(second)
            to_numpy = model.backend.to_numpy
            pairs = [(replayed, logits)] + [(a, b) for mine, theirs in zip(self.cache, new_cache)
                                              for a, b in zip(mine, theirs)]
            for got, want in pairs:
                got, want = np.asarray(to_numpy(got), np.float64), np.asarray(to_numpy(want), np.float64)
                err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
                if not err <= 1e-4:  # NaN fails too
                    raise RuntimeError(f"the replayed step differs from the eager step (relative error {err:.2e})")
        finally:
            self.release()

    def step(self, tokens: np.ndarray) -> Array:  # pragma: no cover - overridden
        raise NotImplementedError


class _TorchGraphStep(_GraphStep):
    def __init__(self, model: MambaLM, batch: int) -> None:
        import torch

        device = model.embedding.device
        with model._on_backend() as xp, torch.no_grad(), torch.cuda.device(device):
            self.ids = torch.zeros(batch, dtype=torch.int64, device=device)
            self.cache = model.init_cache(batch)
            side = torch.cuda.Stream(device)  # warm up off the capture, as torch.cuda.graph asks
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    model._graph_body(xp, self.ids, self.cache)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # a private memory pool: the step's temporaries stay its own
                self.logits = model._graph_body(xp, self.ids, self.cache)
        self._torch = torch

    def step(self, tokens: np.ndarray) -> Array:
        self.ids.copy_(self._torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)))
        self.graph.replay()
        return self.logits


class _CupyGraphStep(_GraphStep):
    """The decoding step of :mod:`portassm.backends.cupy_decode` captured in a ``cupy.cuda.Graph``.

    The ids, the cache and the workspace (temporaries and logits) are allocated before the
    capture and kept with the graph; the captured launches read and write only them.
    """

    def __init__(self, model: MambaLM, batch: int) -> None:
        import cupy as cp

        decoder = model._decoder
        with model._on_backend(), cp.cuda.Device(decoder.device):
            self.ids = cp.zeros(batch, dtype=cp.int64)
            self.cache = decoder.new_cache(batch)
            for conv, ssm in self.cache:
                conv.fill(0)
                ssm.fill(0)
            self.work = decoder.new_workspace(batch)
            self.stream = cp.cuda.Stream(non_blocking=True)  # a capture needs a stream of its own
            self.stream.wait_event(cp.cuda.get_current_stream().record())  # the weights and buffers are written
            with self.stream:
                for _ in range(2):  # compile the kernels and set their attributes outside the capture
                    decoder.run(self.ids, self.cache, self.cache, self.work)
                self.stream.synchronize()
                self.stream.begin_capture()
                try:
                    self.logits = decoder.run(self.ids, self.cache, self.cache, self.work)
                except BaseException:
                    with contextlib.suppress(Exception):
                        self.stream.end_capture()
                    raise
                self.graph = self.stream.end_capture()
            self.stream.synchronize()
        self._cp = cp

    def step(self, tokens: np.ndarray) -> Array:
        stream = self._cp.cuda.get_current_stream()
        self.ids.set(np.ascontiguousarray(tokens, dtype=np.int64), stream=stream)
        self.graph.launch(stream)  # after the ids on the same stream; what reads the logits comes after it
        return self.logits


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def sample_logits(
    logits: np.ndarray,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Sample one token per row from softmax(logits / temperature), in float64 on the host.

    ``top_k`` keeps the k largest logits (ties at the k-th included); ``top_p`` then keeps
    the smallest prefix, most likely first, whose probability reaches ``top_p``.

    Parameters
    ----------
    logits : array, (batch, vocab)

    Returns
    -------
    numpy int64 array, (batch,)
    """
    rng = np.random.default_rng() if rng is None else rng
    scores = np.asarray(logits, dtype=np.float64) / temperature
    vocab = scores.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = np.partition(scores, vocab - top_k, axis=-1)[:, vocab - top_k, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p is not None and top_p < 1:
        order = np.argsort(-scores, axis=-1, kind="stable")
        ranked = np.take_along_axis(scores, order, axis=-1)
        probs = _softmax(ranked)
        before = np.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        ranked = np.where(before >= top_p, -np.inf, ranked)
        np.put_along_axis(scores, order, ranked, axis=-1)
    cdf = np.cumsum(_softmax(scores), axis=-1)
    draw = rng.random(scores.shape[0])[:, None] * cdf[:, -1:]
    return np.minimum((cdf < draw).sum(axis=-1), vocab - 1).astype(np.int64)


def _softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


__all__ = [
    "LAYOUTS",
    "PRESETS",
    "CheckpointError",
    "MambaConfig",
    "MambaLM",
    "check_weights",
    "detect_layout",
    "read_checkpoint",
    "sample_logits",
]
