"""The language model against a real peer: transformers' ``MambaForCausalLM``.

A small random transformers model is saved with ``save_pretrained``; portassm loads the
directory (and the same weights renamed to mamba_ssm's layout) on every backend and must
give the same logits (float32 relative error <= 1e-4, float64 <= 1e-10) and the same
greedy tokens. The step path must agree with the full forward; bad checkpoints must fail
with errors that name the tensor; the CLI must generate from a saved checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
tokenizers = pytest.importorskip("tokenizers")

import portassm  # noqa: E402
from portassm import generate_cli, model as model_module  # noqa: E402
from portassm.model import (  # noqa: E402
    CheckpointError, MambaConfig, MambaLM, _read_safetensors_widening, read_checkpoint, sample_logits,
)

from .helpers import rel_err  # noqa: E402
from .test_cupy import nvrtc  # noqa: E402, F401  (the NVRTC fixture: compiles .cu sources without a GPU)

VOCAB = 56  # a multiple of 8, as mamba_ssm pads it
PROMPT_LEN = 11
NEW_TOKENS = 16
F32_TOL = 1e-4


def _hf_model(dtype=torch.float32, seed: int = 0):
    """A random transformers Mamba whose weights are all far from their initial values.

    Norm weights, D, A_log and conv biases are perturbed (a loader that dropped one of
    them would change the logits) and the projections scaled up, so that greedy decoding
    wanders over the vocabulary instead of repeating one token.
    """
    torch.manual_seed(seed)
    config = transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=3, expand=2, conv_kernel=4,
        eos_token_id=None, pad_token_id=None, bos_token_id=None,
    )
    model = transformers.MambaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith((".D", "A_log", "conv1d.bias")):
                p.add_(0.5 * torch.randn_like(p))
            elif "embeddings" in name:
                p.normal_(0.0, 1.0)
            elif "dt_proj.bias" in name:
                p.add_(1.0)
            else:
                p.mul_(2.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(dtype)


def _hf_greedy(model, ids: np.ndarray, new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' greedy generate: the tokens and the logits that chose each, (batch, new, vocab)."""
    with torch.no_grad():
        out = model.generate(
            torch.from_numpy(ids), max_new_tokens=new_tokens, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences.numpy(), torch.stack(out.logits, dim=1).numpy()


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """The transformers model, its checkpoint directory, a prompt and its reference outputs."""
    model = _hf_model()
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    ids = np.random.default_rng(1).integers(0, VOCAB, (3, PROMPT_LEN))
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)).logits.numpy()
    sequences, step_logits = _hf_greedy(model, ids, NEW_TOKENS)
    assert len(set(sequences[:, PROMPT_LEN:].ravel().tolist())) > 5, "the reference generation should vary"
    return dict(model=model, path=path, ids=ids, logits=logits, sequences=sequences, step_logits=step_logits)


def _write_mamba_ssm(peer_model, path: Path, *, with_lm_head: bool = True, writer: str = "safetensors") -> Path:
    """The peer's weights in mamba_ssm's layout: its config.json (unpadded vocabulary) and names."""
    cfg = peer_model.config
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "d_model": cfg.hidden_size, "n_layer": cfg.num_hidden_layers, "vocab_size": VOCAB - 6,
        "ssm_cfg": {"d_state": cfg.state_size, "d_conv": cfg.conv_kernel, "expand": cfg.expand},
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
        "tie_embeddings": True,
    }))
    tensors = {}
    for name, value in peer_model.state_dict().items():
        if name == "lm_head.weight" and not with_lm_head:
            continue
        tensors[name.replace("backbone.embeddings.", "backbone.embedding.")] = value.detach().clone().contiguous()
    if writer == "torch":
        torch.save(tensors, path / "pytorch_model.bin")
    else:
        safetensors_numpy.save_file({k: v.numpy() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


# ------------------------------------------------------------------------------ agreement with the peer


def test_hf_layout_logits_match_transformers(backend, peer):
    model = MambaLM.from_pretrained(peer["path"])
    assert model.backend.name == backend.name
    logits = backend.to_numpy(model.forward(peer["ids"]))
    assert logits.dtype == np.float32 and logits.shape == (3, PROMPT_LEN, VOCAB)
    assert rel_err(logits, peer["logits"]) <= F32_TOL


def test_mamba_ssm_layout_logits_match_transformers(backend, peer, tmp_path):
    path = _write_mamba_ssm(peer["model"], tmp_path / "mamba_ssm")
    config, _, layout = read_checkpoint(path)
    assert layout == "mamba_ssm" and config.vocab_size == VOCAB  # 50 padded to a multiple of 8
    model = MambaLM.from_pretrained(path)
    assert rel_err(backend.to_numpy(model.forward(peer["ids"])), peer["logits"]) <= F32_TOL
    assert np.array_equal(model.generate(peer["ids"], NEW_TOKENS, temperature=0), peer["sequences"])


def test_greedy_generation_matches_transformers(backend, peer):
    model = MambaLM.from_pretrained(peer["path"])
    tokens = model.generate(peer["ids"], NEW_TOKENS, temperature=0)
    assert tokens.dtype == np.int64
    np.testing.assert_array_equal(tokens, peer["sequences"])
    # the logits of every decoding step, from the cache, against transformers' own cached steps
    logits, cache = model.forward(peer["ids"], return_cache=True, last_only=True)
    steps = [backend.to_numpy(logits)[:, 0]]
    for t in range(PROMPT_LEN, PROMPT_LEN + NEW_TOKENS - 1):
        logits, cache = model.step(peer["sequences"][:, t], cache)
        steps.append(backend.to_numpy(logits))
    assert rel_err(np.stack(steps, axis=1), peer["step_logits"]) <= F32_TOL


def test_step_matches_full_forward(backend, peer):
    model = MambaLM.from_pretrained(peer["path"])
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 9))
    full = backend.to_numpy(model.forward(ids))
    prefill, cache = model.forward(ids[:, :4], return_cache=True)
    got = [backend.to_numpy(prefill)]
    for t in range(4, 9):
        logits, cache = model.step(ids[:, t], cache)
        got.append(backend.to_numpy(logits)[:, None])
    assert rel_err(np.concatenate(got, axis=1), full) <= 1e-5
    # from an empty cache, token by token, and a chunked prefill that continues a cache
    cache = model.init_cache(2)
    stepped = []
    for t in range(9):
        logits, cache = model.step(ids[:, t], cache)
        stepped.append(backend.to_numpy(logits))
    assert rel_err(np.stack(stepped, axis=1), full) <= 1e-5
    _, cache = model.forward(ids[:, :5], return_cache=True)
    assert rel_err(backend.to_numpy(model.forward(ids[:, 5:], cache=cache)), full[:, 5:]) <= 1e-5


@pytest.mark.parametrize("batch", [3, 9])
def test_numba_row_panels_match_the_blas_step(peer, batch):
    """Decoding 2-16 rows on numba goes through the packed weights (numba_gemm); same logits
    as the BLAS products within float32 rounding, and the same greedy tokens."""
    reason = portassm.available_backends()["numba"]
    if reason is not None:
        pytest.skip(f"numba backend unavailable here: {reason}")
    model = MambaLM.from_pretrained(peer["path"], backend="numba")
    ids = np.random.default_rng(5).integers(0, VOCAB, (batch, 6))
    runs = {}
    for packed in (True, False):
        model.row_panels = packed
        _, cache = model.forward(ids[:, :3], return_cache=True)
        logits = []
        for t in range(3, 6):
            out, cache = model.step(ids[:, t], cache)
            logits.append(np.asarray(out))
        runs[packed] = (np.stack(logits, axis=1), model.generate(ids[:, :4], 5, temperature=0))
    assert model._panels is not None
    assert rel_err(runs[True][0], runs[False][0]) <= 1e-6
    np.testing.assert_array_equal(runs[True][1], runs[False][1])


def test_float64_agrees_with_the_numpy_reference(backend, peer):
    """In float64 every backend computes the model as the NumPy reference does, to rounding.

    (transformers is no float64 oracle: its mixer takes A, D and the dt bias in float32.)
    """
    model = MambaLM.from_pretrained(peer["path"], dtype="float64")
    reference = MambaLM.from_pretrained(peer["path"], dtype="float64", backend="numpy")
    logits = backend.to_numpy(model.forward(peer["ids"]))
    assert logits.dtype == np.float64
    assert rel_err(logits, reference.forward(peer["ids"])) <= 1e-12
    assert rel_err(logits, peer["logits"]) <= F32_TOL
    cache = model.init_cache(3)
    for t in range(4):
        step, cache = model.step(peer["ids"][:, t], cache)
    assert rel_err(backend.to_numpy(step), reference.forward(peer["ids"][:, :4])[:, -1]) <= 1e-12


def test_saved_checkpoints_round_trip(peer, tmp_path):
    """save_pretrained in both layouts reloads to the same logits, and transformers reads the "hf" one."""
    model = MambaLM.from_pretrained(peer["path"], backend="numpy")
    ids = peer["ids"]
    for layout in ("hf", "mamba_ssm"):
        model.save_pretrained(tmp_path / layout, layout=layout)
        again = MambaLM.from_pretrained(tmp_path / layout, backend="numpy")
        np.testing.assert_array_equal(again.forward(ids), model.forward(ids))
    theirs = transformers.MambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert rel_err(theirs(torch.from_numpy(ids)).logits.numpy(), peer["logits"]) <= 1e-6


def test_other_weight_files(peer, tmp_path):
    """mamba_ssm's own pytorch_model.bin (read through torch), shards, and bfloat16 read without torch."""
    path = _write_mamba_ssm(peer["model"], tmp_path / "bin", writer="torch")
    model = MambaLM.from_pretrained(path, backend="numpy")
    assert rel_err(model.forward(peer["ids"]), peer["logits"]) <= F32_TOL

    # transformers' sharded form: model.safetensors.index.json naming the file of each tensor
    tensors = safetensors_numpy.load_file(str(peer["path"] / "model.safetensors"))
    (tmp_path / "shards").mkdir()
    weight_map = {name: f"model-0000{i % 2 + 1}-of-00002.safetensors" for i, name in enumerate(sorted(tensors))}
    for shard in set(weight_map.values()):
        part = {name: value for name, value in tensors.items() if weight_map[name] == shard}
        safetensors_numpy.save_file(part, str(tmp_path / "shards" / shard))
    (tmp_path / "shards" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "shards" / "config.json").write_text((peer["path"] / "config.json").read_text())
    model = MambaLM.from_pretrained(tmp_path / "shards", backend="numpy")
    assert rel_err(model.forward(peer["ids"]), peer["logits"]) <= F32_TOL

    from safetensors.torch import save_file

    bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in peer["model"].state_dict().items() if k != "lm_head.weight"}
    (tmp_path / "bf16").mkdir()
    save_file(bf16, str(tmp_path / "bf16" / "model.safetensors"))
    (tmp_path / "bf16" / "config.json").write_text((peer["path"] / "config.json").read_text())
    _, weights, _ = read_checkpoint(tmp_path / "bf16")
    # NumPy reads bfloat16 only where ml_dtypes is imported; the header reader is the path without it
    by_header = _read_safetensors_widening(tmp_path / "bf16" / "model.safetensors")
    for name, value in bf16.items():
        canonical = name.replace("backbone.embeddings.", "backbone.embedding.")
        for got in (weights[canonical], by_header[name]):
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, value.float().numpy())


# ------------------------------------------------------------------------------------------- generation


def test_stream_yields_each_token_as_generate_returns_them(peer):
    model = MambaLM.from_pretrained(peer["path"], backend="numpy")
    ids = peer["ids"][0]  # a 1-D prompt gives 1-D results
    streamed = list(model.stream(ids, 6, temperature=0.8, seed=5))
    assert len(streamed) == 6 and all(t.shape == (1,) for t in streamed)
    seen = []
    out = model.generate(ids, 6, temperature=0.8, seed=5, callback=seen.append)
    assert out.shape == (PROMPT_LEN + 6,)
    np.testing.assert_array_equal(out[PROMPT_LEN:], np.concatenate(streamed))
    np.testing.assert_array_equal(np.concatenate(seen), np.concatenate(streamed))
    np.testing.assert_array_equal(model.generate(ids, 0), ids)


def test_sampling_options(peer):
    model = MambaLM.from_pretrained(peer["path"], backend="numpy")
    ids = peer["ids"]
    greedy = model.generate(ids, 8, temperature=0)
    np.testing.assert_array_equal(model.generate(ids, 8, temperature=1.0, top_k=1, seed=3), greedy)
    np.testing.assert_array_equal(model.generate(ids, 8, temperature=1.0, top_p=1e-9, seed=3), greedy)
    hot = lambda seed: model.generate(ids, 8, temperature=3.0, seed=seed)  # noqa: E731
    np.testing.assert_array_equal(hot(7), hot(7))
    assert not np.array_equal(hot(7), hot(8))


def test_eos_stops_generation(peer):
    model = MambaLM.from_pretrained(peer["path"], backend="numpy")
    new = peer["sequences"][:, PROMPT_LEN:].copy()
    eos = int(new[0, 2])  # the first sequence produces it at its third new token
    firsts = []
    for row in new:  # a sequence that produced eos keeps producing it
        hits = np.flatnonzero(row == eos)
        firsts.append(hits[0] if hits.size else None)
        if hits.size:
            row[hits[0]:] = eos
    length = NEW_TOKENS if None in firsts else max(firsts) + 1  # stops when every sequence has finished
    out = model.generate(peer["ids"], NEW_TOKENS, temperature=0, eos_token_id=eos)
    np.testing.assert_array_equal(out, np.concatenate([peer["ids"], new[:, :length]], axis=1))


def test_sample_logits_follows_the_distribution():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = np.concatenate([sample_logits(logits, 1.0, rng=rng) for _ in range(20000)])
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    top2 = np.concatenate([sample_logits(logits, 1.0, top_k=2, rng=rng) for _ in range(5000)])
    assert set(top2.tolist()) == {0, 1} and abs(np.mean(top2 == 0) - 0.5 / 0.8) < 0.03
    nucleus = np.concatenate([sample_logits(logits, 1.0, top_p=0.7, rng=rng) for _ in range(5000)])
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    sharp = np.concatenate([sample_logits(logits, 0.05, rng=rng) for _ in range(2000)])
    assert np.mean(sharp == 0) > 0.99


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
    ],
)
def test_generation_argument_errors(peer, kwargs, message):
    model = MambaLM.from_pretrained(peer["path"], backend="numpy")
    args = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        model.generate(peer["ids"], **args)


def test_token_errors(peer):
    model = MambaLM.from_pretrained(peer["path"], backend="numpy")
    with pytest.raises(ValueError, match=f"token id {VOCAB} is outside the vocabulary"):
        model.forward([[1, 2, VOCAB]])
    with pytest.raises(TypeError, match="integers"):
        model.forward([[1.5, 2.0]])
    with pytest.raises(ValueError, match="at least one token"):
        model.forward(np.zeros((2, 0), dtype=np.int64))
    with pytest.raises(ValueError, match="cache is for batch 2"):
        model.step([1, 2, 3], model.init_cache(2))


# ------------------------------------------------------------------------------- decoding with CUDA graphs


def test_in_place_step_matches_step(backend, peer):
    """The step a CUDA graph captures (device ids in, the cache overwritten in place) computes
    exactly what :meth:`MambaLM.step` returns, on every backend."""
    model = MambaLM.from_pretrained(peer["path"])
    xp = backend.namespace()
    _, cache = model.forward(peer["ids"], return_cache=True)
    own = model.init_cache(3)
    for (conv, ssm), (conv_new, ssm_new) in zip(own, cache):
        conv[...] = conv_new
        ssm[...] = ssm_new
    for t in range(3):
        tokens = peer["sequences"][:, PROMPT_LEN + t]
        logits, cache = model.step(tokens, cache)
        in_place = model._graph_body(xp, backend.asarray(tokens), own)
        np.testing.assert_array_equal(backend.to_numpy(in_place), backend.to_numpy(logits))
    for (conv, ssm), (conv_new, ssm_new) in zip(own, cache):
        np.testing.assert_array_equal(backend.to_numpy(conv), backend.to_numpy(conv_new))
        np.testing.assert_array_equal(backend.to_numpy(ssm), backend.to_numpy(ssm_new))


def test_failed_capture_warns_and_decodes_step_by_step(peer, monkeypatch):
    class Refused:
        def __init__(self, model, batch):
            raise RuntimeError("capture refused")

    model = MambaLM.from_pretrained(peer["path"], backend="numpy")
    eager = model.generate(peer["ids"], NEW_TOKENS, temperature=0, cuda_graph=False)
    monkeypatch.setattr(model_module, "_graph_kind", lambda m: "torch")
    monkeypatch.setattr(model_module, "_TorchGraphStep", Refused)
    with pytest.warns(RuntimeWarning, match="CUDA graph failed .*capture refused"):
        tokens = model.generate(peer["ids"], NEW_TOKENS, temperature=0)
    np.testing.assert_array_equal(tokens, eager)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tried once per batch size, not at every call
        np.testing.assert_array_equal(model.generate(peer["ids"], NEW_TOKENS, temperature=0), eager)


def _cuda_model(name: str, path, **kwargs) -> MambaLM:
    reason = portassm.available_backends()[name]
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable here: {reason}")
    model = MambaLM.from_pretrained(path, backend=name, **kwargs)
    if name == "torch" and model_module._graph_kind(model) is None:
        pytest.skip("the torch backend is not on a CUDA GPU here")
    return model


class _StandIn(model_module._GraphStep):
    """The static buffers and in-place step of a captured graph, run eagerly on the host."""

    def __init__(self, model, batch):
        self.model = model
        self.ids = model.backend.asarray(np.zeros(batch, dtype=np.int64))
        self.cache = model.init_cache(batch)

    def step(self, tokens):
        with self.model._on_backend() as xp:
            self.ids[...] = self.model.backend.asarray(tokens)
            self.logits = self.model._graph_body(xp, self.ids, self.cache)
        return self.logits


class _Stale(_StandIn):
    """A graph that went wrong: its replays keep the state they were captured with."""

    def step(self, tokens):
        with self.model._on_backend() as xp:
            self.ids[...] = self.model.backend.asarray(tokens)
            return self.model._graph_body(xp, self.ids, self.model.init_cache(self.ids.shape[0]))


def test_a_wrong_graph_is_refused_at_capture(peer, monkeypatch):
    model = MambaLM.from_pretrained(peer["path"], backend="numpy")
    eager = model.generate(peer["ids"], NEW_TOKENS, temperature=0, cuda_graph=False)
    monkeypatch.setattr(model_module, "_graph_kind", lambda m: "torch")
    monkeypatch.setattr(model_module, "_TorchGraphStep", _Stale)
    with pytest.warns(RuntimeWarning, match="differs from the eager step"):
        np.testing.assert_array_equal(model.generate(peer["ids"], NEW_TOKENS, temperature=0), eager)
    assert model._graphs[3] is None


def test_graph_decoding_plumbing_on_the_host(peer, monkeypatch):
    """What the GPU tests check of captured graphs, with the step run eagerly on its static buffers."""
    model = MambaLM.from_pretrained(peer["path"], backend="numpy")
    monkeypatch.setattr(model_module, "_graph_kind", lambda m: "torch")
    monkeypatch.setattr(model_module, "_TorchGraphStep", _StandIn)
    _check_graph_decoding(model, peer)
    _check_two_streams(model, peer)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["torch", "cupy"])
def test_cuda_graph_decoding_gives_the_eager_tokens(name, peer):
    _check_graph_decoding(_cuda_model(name, peer["path"]), peer)


def _check_graph_decoding(model, peer):
    ids = peer["ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture fails the test
        graph = model.generate(ids, NEW_TOKENS, temperature=0, cuda_graph=True)
    captured = model._graphs[3]
    assert isinstance(captured, model_module._GraphStep) and not captured.busy
    eager = model.generate(ids, NEW_TOKENS, temperature=0, cuda_graph=False)
    np.testing.assert_array_equal(graph, eager)
    np.testing.assert_array_equal(graph, peer["sequences"])
    # every generated token is the argmax of the full forward's logits at the position before it
    full = model.backend.to_numpy(model.forward(graph[:, :-1]))
    np.testing.assert_array_equal(full[:, PROMPT_LEN - 1:].argmax(-1), graph[:, PROMPT_LEN:])
    # the graph is reused by later calls, another batch size captures its own
    np.testing.assert_array_equal(model.generate(ids, NEW_TOKENS, temperature=0), graph)
    assert model._graphs[3] is captured
    np.testing.assert_array_equal(model.generate(ids[1], NEW_TOKENS, temperature=0), graph[1])
    assert isinstance(model._graphs[1], model_module._GraphStep)
    # sampling draws the same tokens from the same logits
    np.testing.assert_array_equal(
        model.generate(ids, NEW_TOKENS, temperature=1.5, top_k=20, seed=3),
        model.generate(ids, NEW_TOKENS, temperature=1.5, top_k=20, seed=3, cuda_graph=False),
    )
    # the logits of each replay are the eager step's, and the graph's cache follows the eager one
    logits, cache = model.forward(ids, return_cache=True, last_only=True)
    captured.acquire(cache)
    try:
        for t in range(PROMPT_LEN, PROMPT_LEN + 4):
            replayed = model.backend.to_numpy(captured.step(graph[:, t]))
            logits, cache = model.step(graph[:, t], cache)
            assert rel_err(replayed, model.backend.to_numpy(logits)) <= 1e-6  # the same kernels: equal in practice
        for (conv, ssm), (conv_new, ssm_new) in zip(captured.cache, cache):
            assert rel_err(model.backend.to_numpy(ssm), model.backend.to_numpy(ssm_new)) <= 1e-6
            assert rel_err(model.backend.to_numpy(conv), model.backend.to_numpy(conv_new)) <= 1e-6
    finally:
        captured.release()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["torch", "cupy"])
def test_two_streams_at_once_share_no_graph(name, peer):
    _check_two_streams(_cuda_model(name, peer["path"]), peer)


def _check_two_streams(model, peer):
    """A second stream while the graph decodes the first goes step by step: both stay right."""
    ids = peer["ids"]
    first = model.stream(ids, NEW_TOKENS, temperature=0)
    second = model.stream(ids, NEW_TOKENS, temperature=0)
    pairs = [(a, b) for a, b in zip(first, second)]
    expected = peer["sequences"][:, PROMPT_LEN:]
    np.testing.assert_array_equal(np.stack([a for a, _ in pairs], axis=1), expected)
    np.testing.assert_array_equal(np.stack([b for _, b in pairs], axis=1), expected)
    assert not model._graphs[3].busy


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["torch", "cupy"])
def test_cuda_graph_float64_and_eos(name, peer):
    model = _cuda_model(name, peer["path"], dtype="float64")
    reference = MambaLM.from_pretrained(peer["path"], dtype="float64", backend="numpy")
    ids = peer["ids"]
    np.testing.assert_array_equal(model.generate(ids, 8, temperature=0), reference.generate(ids, 8, temperature=0))
    eos = int(peer["sequences"][0, PROMPT_LEN + 2])
    np.testing.assert_array_equal(
        model.generate(ids, NEW_TOKENS, temperature=0, eos_token_id=eos),
        model.generate(ids, NEW_TOKENS, temperature=0, eos_token_id=eos, cuda_graph=False),
    )


# ------------------------------------------------------------------ the cupy backend's decoding kernels


@pytest.mark.parametrize("ctype, tile", [("float", 1), ("float", 8), ("double", 2), ("double", 4)])
def test_decoding_kernels_compile_with_nvrtc_for_sm90(nvrtc, ctype, tile):
    from portassm.backends import cupy_decode

    names = cupy_decode.kernel_names(ctype, tile)
    ok, log = nvrtc.compile(cupy_decode.source(), "decode.cu", names,
                            [*cupy_decode.NVRTC_OPTIONS, "--gpu-architecture=compute_90"])
    assert ok, f"decode.cu {names} does not compile with NVRTC {nvrtc.version}:\n{log}"
    assert "warning" not in log.lower(), log


def test_decoding_kernel_launch_shapes():
    from portassm.backends import cupy_decode

    assert [cupy_decode.tile_rows(b) for b in (1, 2, 3, 5, 8, 9, 64)] == [1, 2, 4, 8, 8, 8, 8]
    # warps per row: many rows (in_proj, the head) one or two, few rows (x_proj, out_proj) up to 8,
    # never below one 16-byte vector per lane
    assert cupy_decode._split(50280, 768, 4) == 1
    assert cupy_decode._split(3072, 768, 4) == 1
    assert cupy_decode._split(768, 1536, 4) == 4
    assert cupy_decode._split(80, 1536, 4) == 8
    assert cupy_decode._split(128, 32, 4) == 1
    # batch 8: at least 4 rows a block share the staged input rows
    assert cupy_decode._split(768, 1536, 4, tile=8) == 2
    assert cupy_decode._split(80, 1536, 4, tile=4) == 4
    config = MambaConfig(d_model=32, n_layer=1, vocab_size=56, d_state=33)
    assert "d_state 33" in cupy_decode.unsupported(config, "float32")
    assert "float16" in cupy_decode.unsupported(MambaConfig(d_model=32, n_layer=1, vocab_size=56), "float16")
    assert cupy_decode.unsupported(MambaConfig(d_model=32, n_layer=1, vocab_size=56), "float64") is None


_DECODING_FORMS = {
    # biases on the projections, no conv bias, d_conv 3, d_state 20 (a channel's 32 lanes, some
    # idle), d_model 30 (rows that are no whole number of 16-byte vectors)
    "odd": dict(d_model=30, n_layer=2, vocab_size=50, d_state=20, d_conv=3, bias=True, conv_bias=False),
    # 16-byte vectors everywhere, 2 and 4 warps sharing a row (in_proj, out_proj, head)
    "vectors": dict(d_model=256, n_layer=2, vocab_size=300, d_state=16, bias=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("form", list(_DECODING_FORMS))
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float64", 1e-12)])
def test_cupy_decoding_kernels_agree_with_the_generic_step(dtype, tol, form):
    """Every form the kernels take, at batch 1, 3 and 11 (above the 8 rows staged at once):
    the kernels' step, launched one by one and replayed from a graph, against the step of
    CuPy operations and cuBLAS."""
    reason = portassm.available_backends()["cupy"]
    if reason is not None:
        pytest.skip(f"backend 'cupy' unavailable here: {reason}")
    config = MambaConfig(**_DECODING_FORMS[form])
    weights = MambaLM.random(config, seed=4, backend="numpy").state_dict()
    rng = np.random.default_rng(5)
    for name in ("in_proj.bias", "out_proj.bias"):
        for i in range(config.n_layer):
            key = f"backbone.layers.{i}.mixer.{name}"
            weights[key] = rng.normal(0.0, 0.5, weights[key].shape).astype(np.float32)
    model = MambaLM(config, weights, backend="cupy", dtype=dtype)
    assert model._decoder is not None and model_module._graph_kind(model) == "cupy"
    generic = MambaLM(config, weights, backend="cupy", dtype=dtype)
    generic._decoder = None  # the step of CuPy operations and cuBLAS
    to_numpy = model.backend.to_numpy
    for batch in (1, 3, 11):
        ids = rng.integers(0, config.vocab_size, (batch, 7))
        _, cache = model.forward(ids, return_cache=True)
        mine, theirs = cache, cache
        for t in range(3):
            tokens = rng.integers(0, config.vocab_size, batch)
            logits, mine = model.step(tokens, mine)
            want, theirs = generic.step(tokens, theirs)
            assert rel_err(to_numpy(logits), to_numpy(want)) <= tol
            for (conv, ssm), (conv_w, ssm_w) in zip(mine, theirs):
                assert rel_err(to_numpy(conv), to_numpy(conv_w)) <= tol
                assert rel_err(to_numpy(ssm), to_numpy(ssm_w)) <= tol
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            graph = model._decoding_graph(batch)
        assert isinstance(graph, model_module._CupyGraphStep)
        graph.acquire(mine)
        try:
            for t in range(2):
                tokens = rng.integers(0, config.vocab_size, batch)
                replayed = to_numpy(graph.step(tokens))
                logits, mine = model.step(tokens, mine)
                np.testing.assert_array_equal(replayed, to_numpy(logits))  # the same kernels on the same data
            for (conv, ssm), (conv_w, ssm_w) in zip(graph.cache, mine):
                np.testing.assert_array_equal(to_numpy(ssm), to_numpy(ssm_w))
                np.testing.assert_array_equal(to_numpy(conv), to_numpy(conv_w))
        finally:
            graph.release()


# -------------------------------------------------------------------------------------- bad checkpoints


def _copy_with(peer, tmp_path: Path, change) -> Path:
    """The peer checkpoint with its tensors changed by ``change(dict)``."""
    tensors = safetensors_numpy.load_file(str(peer["path"] / "model.safetensors"))
    change(tensors)
    tmp_path.mkdir(exist_ok=True)
    safetensors_numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((peer["path"] / "config.json").read_text())
    return tmp_path


def test_missing_tensor_is_named(peer, tmp_path):
    path = _copy_with(peer, tmp_path, lambda t: t.pop("backbone.layers.1.mixer.A_log"))
    with pytest.raises(CheckpointError, match=r"missing backbone\.layers\.1\.mixer\.A_log \(expected shape \(64, 8\)\)"):
        MambaLM.from_pretrained(path)


def test_mismatched_tensors_are_named_all_at_once(peer, tmp_path):
    def change(t):
        t["backbone.layers.0.mixer.in_proj.weight"] = t["backbone.layers.0.mixer.in_proj.weight"][:, :31].copy()
        t["backbone.embeddings.weight"] = np.zeros((VOCAB + 1, 32), np.float32)
        t["backbone.layers.7.norm.weight"] = np.ones(32, np.float32)

    path = _copy_with(peer, tmp_path, change)
    with pytest.raises(CheckpointError) as info:
        MambaLM.from_pretrained(path)
    message = str(info.value)
    assert "backbone.layers.0.mixer.in_proj.weight has shape (128, 31), expected (128, 32)" in message
    assert f"backbone.embeddings.weight has shape ({VOCAB + 1}, 32), expected ({VOCAB}, 32)" in message
    assert "unexpected tensor backbone.layers.7.norm.weight of shape (32,)" in message


def test_unsupported_configs_and_missing_files(peer, tmp_path):
    path = _write_mamba_ssm(peer["model"], tmp_path / "m2")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "ssm_cfg": {**cfg["ssm_cfg"], "layer": "Mamba2"}}))
    with pytest.raises(CheckpointError, match="Mamba2"):
        MambaLM.from_pretrained(path)
    (path / "config.json").write_text(json.dumps({"n_embd": 3}))
    with pytest.raises(CheckpointError, match="neither"):
        MambaLM.from_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MambaLM.from_pretrained(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((peer["path"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        MambaLM.from_pretrained(empty)


def test_constructor_checks_weights_before_converting():
    config = MambaConfig(d_model=16, n_layer=2, vocab_size=24, d_state=4)
    weights = MambaLM.random(config, seed=0, backend="numpy").state_dict()
    del weights["backbone.norm_f.weight"]
    with pytest.raises(CheckpointError, match=r"missing backbone\.norm_f\.weight"):
        MambaLM(config, weights, backend="numpy")


# ---------------------------------------------------------------------------------------------- the CLI


def _word_tokenizer(path: Path) -> tokenizers.Tokenizer:
    """A word-level tokenizer trained here, with exactly the model's vocabulary size."""
    from tokenizers import models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words = [f"w{i}" for i in range(VOCAB - 1)]
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[UNK]"]))
    assert tokenizer.get_vocab_size() == VOCAB
    tokenizer.save(str(path / "tokenizer.json"))
    return tokenizer


@pytest.fixture(scope="module")
def cli_checkpoint(peer, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli")
    MambaLM.from_pretrained(peer["path"], backend="numpy").save_pretrained(path)
    return path, _word_tokenizer(path)


def _expected_text(path: Path, tokenizer, prompt: str, new_tokens: int) -> str:
    ids = tokenizer.encode(prompt).ids
    model = MambaLM.from_pretrained(path, backend="numpy")
    out = model.generate([ids], new_tokens, temperature=0)[0]
    return prompt + tokenizer.decode(out.tolist())[len(tokenizer.decode(ids)):] + "\n"


def test_cli_generate_streams_text(cli_checkpoint, capsys):
    path, tokenizer = cli_checkpoint
    prompt = "w3 w17 w5 w40"
    argv = ["--model", str(path), "--prompt", prompt, "--max-new-tokens", "7", "--temperature", "0", "--backend", "numpy"]
    assert generate_cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == _expected_text(path, tokenizer, prompt, 7)
    assert "7 tokens" in captured.err


def test_cli_reports_a_bad_checkpoint(cli_checkpoint, tmp_path, capsys):
    path, _ = cli_checkpoint
    (tmp_path / "tokenizer.json").write_text((path / "tokenizer.json").read_text())
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    assert generate_cli.main(["--model", str(tmp_path), "--prompt", "w1", "--backend", "numpy"]) == 2
    assert "has no model.safetensors" in capsys.readouterr().err


def test_text_stream_waits_for_whole_characters():
    class Bytes:  # a byte-level decoder: token i is byte i
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = generate_cli.TextStream(Bytes(), list(b"caf"))
    pieces = [stream.push(b) for b in "é!".encode()]
    assert pieces == ["", "é", "!"]


def test_python_m_portassm_generate(cli_checkpoint):
    """The subcommand of ``python -m portassm`` (a fresh process, as a user runs it)."""
    path, tokenizer = cli_checkpoint
    prompt = "w1 w2"
    result = subprocess.run(
        [sys.executable, "-m", "portassm", "generate", "--model", str(path), "--prompt", prompt,
         "--max-new-tokens", "5", "--temperature", "0", "--backend", "numpy"],
        capture_output=True, text=True, timeout=300, check=False, cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == _expected_text(path, tokenizer, prompt, 5)
