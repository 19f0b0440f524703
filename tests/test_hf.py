"""recyclegpt.hf: conversion to/from transformers Llama/Mistral/Qwen2 and loading local HF directories.

Tiny random models built with transformers in the test (fp32, no downloads); logits must match.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Qwen2Config,
)

from recyclegpt.config import ModelConfig  # noqa: E402
from recyclegpt.errors import RecycleError  # noqa: E402
from recyclegpt.hf import (  # noqa: E402
    from_hf_model,
    from_hf_state_dict,
    hf_config_from_model_config,
    load_hf_model_dir,
    model_config_from_hf,
    to_hf_model,
    to_hf_state_dict,
)
from recyclegpt.model import FullModel  # noqa: E402
from recyclegpt.tokenizer import Tokenizer  # noqa: E402

ATOL = 1e-5
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
            intermediate_size=96, max_position_embeddings=64, rms_norm_eps=1e-5)
FAMILIES = {
    "llama": (LlamaConfig, dict(rope_theta=50000.0)),
    "llama-tied": (LlamaConfig, dict(tie_word_embeddings=True)),
    "mistral": (MistralConfig, dict(rope_theta=20000.0, sliding_window=None)),
    "qwen2": (Qwen2Config, dict(rope_theta=1e6)),
    "qwen2-tied": (Qwen2Config, dict(tie_word_embeddings=True)),
}


def make_hf(family: str, **overrides):
    cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    cfg = cls(**{**TINY, **extra, **overrides})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random norms and biases too, so a swapped name cannot hide
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def logits_close(hf_model, native, T: int = 19) -> None:
    torch.manual_seed(1)
    idx = torch.randint(0, hf_model.config.vocab_size, (2, T))
    with torch.no_grad():
        ref = hf_model(idx).logits
        ours, _ = native(idx)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_dir_matches_transformers(tmp_path, family):
    hf = make_hf(family)
    hf.save_pretrained(tmp_path)
    cfg, model, tok, template = load_hf_model_dir(tmp_path)
    assert (cfg.dim, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.vocab_size) == (64, 2, 4, 2, 128)
    assert cfg.qkv_bias == family.startswith("qwen2")
    assert cfg.tie_embeddings == family.endswith("tied")
    assert cfg.rope_theta == pytest.approx(FAMILIES[family][1].get("rope_theta", 10000.0))
    if cfg.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert tok is None and template is None
    logits_close(hf, model)


def test_sharded_dir_and_cached_decode(tmp_path):
    hf = make_hf("qwen2")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    _, model, _, _ = load_hf_model_dir(tmp_path)
    logits_close(hf, model)
    # The static-cache path (prefill, then one token at a time) gives the same logits as HF.
    idx = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        ref = hf(idx).logits
        model.setup_caches(1)
        pre, _ = model(idx[:, :8], torch.arange(8)[None])
        steps = [model(idx[:, t:t + 1], torch.tensor([[t]]))[0] for t in range(8, 12)]
    torch.testing.assert_close(torch.cat([pre, *steps], 1), ref, atol=ATOL, rtol=0)


def test_lazy_loading_never_reads_whole_files(tmp_path, monkeypatch):
    import safetensors.torch

    make_hf("llama").save_pretrained(tmp_path)

    def boom(*a, **k):
        raise AssertionError("load_file reads a whole file into memory")

    monkeypatch.setattr(safetensors.torch, "load_file", boom)
    cfg, model, _, _ = load_hf_model_dir(tmp_path, dtype=torch.bfloat16)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16


def test_round_trip_native_hf_native():
    for qkv_bias, tie in ((False, True), (True, False)):
        torch.manual_seed(2)
        cfg = ModelConfig(vocab_size=96, dim=64, n_layer=2, n_head=4, n_kv_head=2, ffn_dim=80, max_seq_len=32,
                          rope_theta=30000.0, norm_eps=1e-6, tie_embeddings=tie, qkv_bias=qkv_bias)
        native = FullModel(cfg).eval()
        with torch.no_grad():
            for p in native.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        hf = to_hf_model(native)
        assert type(hf).__name__ == ("Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM")
        logits_close(hf, native)
        cfg2, back = from_hf_model(hf)
        assert cfg2 == cfg
        logits_close(hf, back)
        sd = from_hf_state_dict(to_hf_state_dict(native), cfg)
        own = {k: v for k, v in native.state_dict().items() if not (tie and k == "output.weight")}
        assert set(sd) == set(own) and all(torch.equal(sd[k], own[k]) for k in own)


def test_hf_config_from_model_config_fields():
    cfg = ModelConfig(vocab_size=96, dim=64, n_layer=3, n_head=4, n_kv_head=1, ffn_dim=80, max_seq_len=40,
                      rope_theta=123.0, norm_eps=1e-6, tie_embeddings=False)
    hf = hf_config_from_model_config(cfg, eos_token_id=5)
    assert isinstance(hf, LlamaConfig) and hf.architectures == ["LlamaForCausalLM"]
    assert (hf.num_key_value_heads, hf.head_dim, hf.max_position_embeddings) == (1, 16, 40)
    assert hf.eos_token_id == 5
    assert model_config_from_hf(hf) == cfg
    assert model_config_from_hf(hf.to_dict()) == cfg  # a parsed config.json works too
    # transformers 4 style dict (rope_theta at the top level, no rope_parameters)
    d = {k: v for k, v in hf.to_dict().items() if k != "rope_parameters"}
    assert model_config_from_hf({**d, "rope_theta": 123.0, "rope_scaling": None}).rope_theta == 123.0


def test_tokenizer_eos_and_chat_template(tmp_path):
    tok = Tokenizer.train(["hello world, hello tokens", "def add(a, b): return a + b"] * 4, vocab_size=300)
    # The native byte-level vocab (300) is larger than 128: use a bigger tiny model.
    hf = make_hf("llama", vocab_size=320, eos_token_id=0)
    hf.save_pretrained(tmp_path)
    tok.save(tmp_path / "tokenizer.json")
    _, _, loaded, template = load_hf_model_dir(tmp_path)
    assert loaded is not None and template is None
    assert loaded.eos_id == 0 and loaded.encode("hello world") == tok.encode("hello world")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|endoftext|>"}, "chat_template": "{{ messages }}"}))
    _, _, loaded, template = load_hf_model_dir(tmp_path)
    assert loaded.eos_id == tok.eos_id and template == "{{ messages }}"
    # transformers >= 4.43 writes the template to chat_template.jinja
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m }}{% endfor %}")
    assert load_hf_model_dir(tmp_path)[3].startswith("{% for m")


def test_tokenizer_larger_than_model_is_refused(tmp_path):
    make_hf("llama").save_pretrained(tmp_path)
    Tokenizer.train(["a b c d e f"], vocab_size=300).save(tmp_path / "tokenizer.json")
    with pytest.raises(RecycleError, match=r"has \d+ tokens but the model only 128"):
        load_hf_model_dir(tmp_path)


@pytest.mark.parametrize("change, match", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope type 'linear'"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                           "rope_theta": 1e4}), "rope type 'llama3'"),
    (dict(head_dim=32), "head_dim=32"),
    (dict(attention_bias=True), "o_proj"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_inexpressible_llama_configs_are_refused(change, match):
    with pytest.raises(RecycleError, match=match) as e:
        model_config_from_hf(LlamaConfig(**{**TINY, **change}))
    assert "\n" not in str(e.value)


def test_sliding_window(tmp_path):
    with pytest.raises(RecycleError, match="sliding_window=16 is shorter than the context 64"):
        model_config_from_hf(MistralConfig(**TINY, sliding_window=16))
    assert model_config_from_hf(MistralConfig(**TINY, sliding_window=16), max_seq_len=16).max_seq_len == 16
    assert model_config_from_hf(MistralConfig(**TINY, sliding_window=64)).max_seq_len == 64
    with pytest.raises(RecycleError, match="sliding_window"):
        model_config_from_hf(Qwen2Config(**TINY, use_sliding_window=True, sliding_window=8,
                                         max_window_layers=1))
    assert model_config_from_hf(Qwen2Config(**TINY, sliding_window=8)).max_seq_len == 64  # window unused
    hf = make_hf("mistral", sliding_window=16)
    hf.save_pretrained(tmp_path)
    _, model, _, _ = load_hf_model_dir(tmp_path, max_seq_len=16)
    logits_close(hf, model, T=16)


def test_unsupported_and_broken_directories(tmp_path):
    with pytest.raises(RecycleError, match="not a model directory"):
        load_hf_model_dir(tmp_path / "nope")
    with pytest.raises(RecycleError, match="model config not found"):
        load_hf_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(RecycleError, match="corrupt model config"):
        load_hf_model_dir(tmp_path)
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    (tmp_path / "config.json").write_text(json.dumps(gpt2))
    with pytest.raises(RecycleError, match="unsupported architecture.*GPT2LMHeadModel"):
        load_hf_model_dir(tmp_path)
    cfg = LlamaConfig(**TINY).to_dict()
    classifier = {**cfg, "architectures": ["LlamaForSequenceClassification"]}
    (tmp_path / "config.json").write_text(json.dumps(classifier))
    with pytest.raises(RecycleError, match="unsupported architecture"):
        load_hf_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RecycleError, match="no weights"):
        load_hf_model_dir(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(RecycleError, match="pickle"):
        load_hf_model_dir(tmp_path)


def test_missing_shard_corrupt_file_and_wrong_shapes(tmp_path):
    sharded = tmp_path / "sharded"
    make_hf("llama").save_pretrained(sharded, max_shard_size="20KB")
    next(iter(sorted(sharded.glob("model-*.safetensors")))).unlink()
    with pytest.raises(RecycleError, match="shard .* is missing"):
        load_hf_model_dir(sharded)

    single = tmp_path / "single"
    make_hf("llama").save_pretrained(single)
    data = (single / "model.safetensors").read_bytes()
    (single / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RecycleError, match="corrupt weights file"):
        load_hf_model_dir(single)

    wrong = tmp_path / "wrong"
    make_hf("llama").save_pretrained(wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(RecycleError, match="has shape"):
        load_hf_model_dir(wrong)
    (wrong / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(RecycleError, match="missing"):
        load_hf_model_dir(wrong)


def test_exported_hf_model_is_plain_llama():
    cfg = ModelConfig(vocab_size=64, dim=32, n_layer=1, n_head=2, n_kv_head=2, ffn_dim=48, max_seq_len=16)
    hf = to_hf_model(FullModel(cfg))
    assert isinstance(hf, LlamaForCausalLM)
    assert hf.model.embed_tokens.weight.data_ptr() == hf.lm_head.weight.data_ptr()  # tied
