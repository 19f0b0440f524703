"""`recyclegpt export --format gguf`: the file llama.cpp reads, checked without llama.cpp.

- a forward pass written the way llama.cpp's `llama` architecture computes it (adjacent-pair RoPE, GGUF
  tensor names), run in numpy over the tensors read back from the file, gives the model's logits;
- GPT-2's pre-tokenizer regex and the file's merges, applied as llama.cpp applies a `gpt2`/`gpt-2`
  vocabulary, give our tokenizer's ids;
- metadata, vocabulary padding, bf16 matrices with float32 norms, the command line.
llama.cpp itself loading the file is `benchmarks/llama_cpp.py` (opt-in test: RECYCLEGPT_LLAMA_CPP_TESTS=1).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CORPUS_LINES, load_benchmark, make_checkpoint

from recyclegpt import cli
from recyclegpt.checkpoint import load_checkpoint
from recyclegpt.errors import RecycleError
from recyclegpt.hf.gguf import GGUF_FILE, export_gguf, interleave_rope_rows

gguf = pytest.importorskip("gguf")
regex = pytest.importorskip("regex")

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox's tail", "  x =  1_000 // 7\t\n\n",
         "naïve café — 東京 🙂", "it's we'll they've I'm", ""]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    ckpt = make_checkpoint(root / "ckpt")
    return ckpt, export_gguf(ckpt, root / "out")


def read(path: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, int]]:
    """(metadata, tensors as float64 arrays in their written shapes, GGML type per tensor)."""
    r = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors, types = {}, {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        data = np.array(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        tensors[t.name] = data.reshape(shape).astype(np.float64)
        types[t.name] = int(t.tensor_type)
    return meta, tensors, types


def llama_cpp_forward(meta: dict, w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Logits [T, V] as llama.cpp's `llama` graph computes them (float64): RMSNorm, RoPE over adjacent pairs
    of each head, grouped-query causal attention, SwiGLU, tied output when `output.weight` is absent."""
    n_head, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    eps, theta = meta["llama.attention.layer_norm_rms_epsilon"], meta["llama.rope.freq_base"]
    x = w["token_embd.weight"][ids]  # [T, D]
    T, D = x.shape
    hd = D // n_head

    def norm(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * g

    def rope(v):  # [T, H, hd]: pairs (2i, 2i+1) rotate by pos * theta^(-2i/hd)
        freqs = theta ** (-np.arange(0, hd, 2) / hd)
        ang = np.arange(T)[:, None] * freqs[None]  # [T, hd/2]
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(meta["llama.block_count"]):
        p = f"blk.{i}."
        h = norm(x, w[p + "attn_norm.weight"])
        q = rope((h @ w[p + "attn_q.weight"].T).reshape(T, n_head, hd))
        k = rope((h @ w[p + "attn_k.weight"].T).reshape(T, n_kv, hd))
        v = (h @ w[p + "attn_v.weight"].T).reshape(T, n_kv, hd)
        k, v = np.repeat(k, n_head // n_kv, 1), np.repeat(v, n_head // n_kv, 1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        att = np.einsum("hts,shd->thd", s / s.sum(-1, keepdims=True), v).reshape(T, D)
        x = x + att @ w[p + "attn_output.weight"].T
        h = norm(x, w[p + "ffn_norm.weight"])
        gate = h @ w[p + "ffn_gate.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    return norm(x, w["output_norm.weight"]) @ w.get("output.weight", w["token_embd.weight"]).T


def test_llama_cpp_graph_over_the_file_gives_the_models_logits(exported):
    ckpt, path = exported
    _, model, _, tok = load_checkpoint(ckpt, torch.device("cpu"), torch.float32)
    meta, tensors, _ = read(path)
    ids = tok.encode(CORPUS_LINES[1] + CORPUS_LINES[0])[:40]
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0][0].double().numpy()  # uncached causal pass
    got = llama_cpp_forward(meta, tensors, ids)
    err = np.abs(got - want).max()
    assert err < 1e-4 * np.abs(want).max()  # float32 against float64
    assert (got.argmax(-1) == want.argmax(-1)).all()
    # the permutation matters: read with the halves layout, the same graph is wrong
    wrong = dict(tensors)
    for name in [n for n in tensors if n.endswith(("attn_q.weight", "attn_k.weight"))]:
        heads = meta["llama.attention.head_count" + ("_kv" if "attn_k" in name else "")]
        wrong[name] = interleave_rope_rows(torch.from_numpy(tensors[name]), heads).numpy()  # interleaved twice
    assert np.abs(llama_cpp_forward(meta, wrong, ids) - want).max() > 100 * err


def gpt2_bpe(text: str, tokens: list[str], merges: list[str]) -> list[int]:
    """Token ids as llama.cpp's `gpt2` vocabulary with the `gpt-2` pre-tokenizer makes them: split with GPT-2's
    regex, map bytes to GPT-2's printable characters, merge pairs by rank."""
    table = {}
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    n = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    rank = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    index = {t: i for i, t in enumerate(tokens)}
    out = []
    for piece in regex.findall(GPT2_SPLIT, text):
        word = [table[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [(rank.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(word, word[1:], strict=False))]
            best, i = min(pairs)
            if best == math.inf:
                break
            word[i:i + 2] = [word[i] + word[i + 1]]
        out += [index[t] for t in word]
    return out


def test_the_declared_pre_tokenizer_and_merges_give_our_ids(exported):
    ckpt, path = exported
    _, _, _, tok = load_checkpoint(ckpt, torch.device("cpu"), torch.float32)
    meta, _, _ = read(path)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    for text in TEXTS + CORPUS_LINES:
        assert gpt2_bpe(text, tokens, merges) == tok.encode(text), text


@pytest.mark.parametrize("pre,normalizer", [
    ({"type": "Whitespace"}, None),
    ({"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}, None),
    ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}, None),
    ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, {"type": "NFC"}),
])
def test_a_tokenizer_that_splits_otherwise_is_refused(exported, pre, normalizer):
    """The file declares GPT-2's pre-tokenizer: a tokenizer that splits text another way is refused, never
    written with a declaration llama.cpp would follow to other token ids."""
    from tokenizers import Tokenizer as HFTokenizer

    from recyclegpt.hf.gguf import vocabulary
    from recyclegpt.tokenizer import Tokenizer

    ckpt, _ = exported
    _, _, _, tok = load_checkpoint(ckpt, torch.device("cpu"), torch.float32)
    assert vocabulary(tok, tok.vocab_size)[0]  # the checkpoint's own tokenizer passes
    spec = json.loads(tok.tok.to_str())
    spec["pre_tokenizer"], spec["normalizer"] = pre, normalizer
    other = Tokenizer(HFTokenizer.from_str(json.dumps(spec)))
    with pytest.raises(RecycleError, match="convert_hf_to_gguf"):
        vocabulary(other, tok.vocab_size)


def test_metadata_and_vocabulary(exported):
    ckpt, path = exported
    cfg, model, _, tok = load_checkpoint(ckpt, torch.device("cpu"), torch.float32)
    meta, tensors, types = read(path)
    m = cfg.model
    assert meta["general.architecture"] == "llama"
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"],
            meta["llama.context_length"], meta["llama.rope.dimension_count"]) == (
        m.n_layer, m.dim, m.ffn_dim, m.max_seq_len, m.dim // m.n_head)
    tokens, types_ = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == m.vocab_size == len(types_)
    assert tokens[:tok.vocab_size] == [tok.tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert all(t.startswith("[PAD") for t in tokens[tok.vocab_size:])
    assert types_[tok.eos_id] == gguf.TokenType.CONTROL and meta["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert set(types.values()) == {gguf.GGMLQuantizationType.F32}
    assert ("output.weight" in tensors) == (not m.tie_embeddings)
    gate = model.layers[0].feed_forward.w1.weight.detach().double().numpy()
    assert np.array_equal(tensors["blk.0.ffn_gate.weight"], gate)


def test_bfloat16_matrices_keep_float32_norms(exported, tmp_path):
    ckpt, _ = exported
    _, model, _, _ = load_checkpoint(ckpt, torch.device("cpu"), torch.float32)
    _, tensors, types = read(export_gguf(ckpt, tmp_path / "bf16", dtype="bfloat16"))
    for name, t in types.items():
        want = gguf.GGMLQuantizationType.F32 if name.endswith("norm.weight") else gguf.GGMLQuantizationType.BF16
        assert t == want, name
    w = model.layers[1].attention.wv.weight.detach().to(torch.bfloat16).double().numpy()
    assert np.array_equal(tensors["blk.1.attn_v.weight"], w)


def test_command_line(exported, tmp_path, capsys):
    ckpt, _ = exported
    assert cli.main(["export", str(ckpt), "--format", "gguf", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / GGUF_FILE).is_file() and "llama-cli" in capsys.readouterr().out
    assert cli.main(["export", str(ckpt), "--format", "gguf", "--out", str(tmp_path / "o")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_llama_bench_output_parses():
    """llama-bench -o json (one test): the median of the samples, n and depth."""
    lc = load_benchmark("llama_cpp")
    out = json.dumps([{"n_prompt": 0, "n_gen": 128, "n_depth": 170, "avg_ts": 240.0,
                       "samples_ts": [250.5, 230.25, 240.0, 260.0, 200.0]}])
    got = lc.parse_bench(out)
    assert got == {"tokens_per_s": 240.0, "samples": [200.0, 230.25, 240.0, 250.5, 260.0], "n": 128, "depth": 170}
    old = json.dumps([{"n_gen": 16, "avg_ts": 99.5}])  # builds without samples or depth
    assert lc.parse_bench(old) == {"tokens_per_s": 99.5, "samples": [99.5], "n": 16, "depth": 0}


@pytest.mark.llama_cpp
@pytest.mark.skipif(os.environ.get("RECYCLEGPT_LLAMA_CPP_TESTS") != "1",
                    reason="builds llama.cpp (about 15 min on 2 cores); opt in with RECYCLEGPT_LLAMA_CPP_TESTS=1")
def test_llama_cpp_tokenizes_and_decodes_like_recyclegpt(exported, tmp_path):
    ckpt, path = exported
    lc = load_benchmark("llama_cpp")
    build = lc.build_llama_cpp()
    _, _, _, tok = load_checkpoint(ckpt, torch.device("cpu"), torch.float32)
    for text in TEXTS[:-1] + CORPUS_LINES:
        assert lc.tokenize(build, path, text) == tok.encode(text), text
    report = lc.compare_greedy(build, ckpt, path, ["def add(a, b):", "The quick brown"], max_new_tokens=16)
    assert all(r["identical"] for r in report), report
