"""recyclegpt.hf exports: transformers directory for the full model, EAGLE-1 draft for vLLM / SGLang."""

from __future__ import annotations

import json
import os
import shlex
import stat

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding  # noqa: E402

from recyclegpt.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from recyclegpt.config import Config, ModelConfig, ModuleConfig, TokenizerConfig  # noqa: E402
from recyclegpt.errors import RecycleError  # noqa: E402
from recyclegpt.hf import (  # noqa: E402
    check_module_fits,
    export_eagle,
    export_hf,
    load_hf_model_dir,
    serving_command,
    serving_commands,
)
from recyclegpt.model import FullModel  # noqa: E402
from recyclegpt.module import RecyclableModule  # noqa: E402
from recyclegpt.tokenizer import Tokenizer  # noqa: E402

ATOL = 1e-5
TEXTS = ["hello world, hello tokens", "def add(a, b):\n    return a + b", "the quick brown fox"] * 4


def make_ckpt(path, *, tie=True, qkv_bias=False, module=None, dim=64, vocab=320):
    torch.manual_seed(0)
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    mc = ModelConfig(vocab_size=vocab, dim=dim, n_layer=2, n_head=4, n_kv_head=2, ffn_dim=96, max_seq_len=64,
                     rope_theta=20000.0, norm_eps=1e-6, tie_embeddings=tie, qkv_bias=qkv_bias)
    cfg = Config(model=mc, module=module or ModuleConfig(n_layer=1),
                 tokenizer=TokenizerConfig(vocab_size=vocab), eos_token_id=tok.eos_id)
    model, mod = FullModel(mc), RecyclableModule(mc, cfg.module)
    with torch.no_grad():  # random norms and biases too, so a swapped name cannot hide
        for p in [*model.parameters(), *mod.parameters()]:
            p.add_(torch.randn_like(p) * 0.05)
    return save_checkpoint(path, cfg, model, mod, tok)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("ck") / "ckpt")


def no_temp_leftovers(parent):
    return not [p.name for p in parent.iterdir() if ".tmp" in p.name or p.name.endswith(".old")]


# ------------------------------------------------------------------------------------- export_hf

@pytest.mark.parametrize("tie, qkv_bias", [(True, False), (False, True)])
def test_export_hf_loads_in_transformers(tmp_path, tie, qkv_bias):
    ck = make_ckpt(tmp_path / "ck", tie=tie, qkv_bias=qkv_bias)
    out = export_hf(ck, tmp_path / "hf")
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json"}
    assert no_temp_leftovers(tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM"]
    assert config["rope_theta"] == 20000.0 and config["tie_word_embeddings"] == tie
    cls = AutoModelForCausalLM if qkv_bias else LlamaForCausalLM
    hf = cls.from_pretrained(out).eval()
    _, model, _, tok = load_checkpoint(ck)
    idx = torch.tensor([tok.encode("hello world, def add(a, b): return the quick fox")])
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=ATOL, rtol=0)
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok("def add(a, b)")["input_ids"] == tok.encode("def add(a, b)")
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == tok.eos_id == hf.config.eos_token_id
    # and the native HF loader reads it back: same logits, same tokenizer/eos
    _, back, back_tok, _ = load_hf_model_dir(out)
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], model(idx)[0], atol=ATOL, rtol=0)
    assert back_tok.eos_id == tok.eos_id


def test_export_hf_is_atomic_and_careful(tmp_path, ckpt, monkeypatch):
    import recyclegpt.hf.export as ex

    out = tmp_path / "hf"
    export_hf(ckpt, out)
    with pytest.raises(RecycleError, match="already exists"):
        export_hf(ckpt, out)
    export_hf(ckpt, out, overwrite=True, dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    with pytest.raises(RecycleError, match="is the checkpoint itself"):
        export_hf(ckpt, ckpt, overwrite=True)

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ex, "_save", fail)
    with pytest.raises(OSError):
        export_hf(ckpt, tmp_path / "never")
    assert not (tmp_path / "never").exists() and no_temp_leftovers(tmp_path)
    with pytest.raises(OSError):  # a failed overwrite keeps the old export intact
        export_hf(ckpt, out, overwrite=True)
    assert (out / "model.safetensors").is_file() and no_temp_leftovers(tmp_path)


def _modes(root):
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_exports_are_readable_like_save_pretrained(tmp_path, ckpt):
    """Directories 0755, files 0644 (as save_checkpoint / save_pretrained leave them), even under a
    private umask and for copied files that were private: an engine running as another user reads them."""
    from recyclegpt.hf.generic import copy_base_dir

    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    (base / "config.json").write_text("{}")
    (base / "sub" / "weights.bin").write_bytes(b"0")
    (base / "config.json").chmod(0o600)
    (base / "sub" / "weights.bin").chmod(0o600)
    (base / "sub").chmod(0o700)
    old = os.umask(0o077)
    try:
        outs = [export_hf(ckpt, tmp_path / "hf"), export_eagle(ckpt, tmp_path / "vllm"),
                export_eagle(ckpt, tmp_path / "sglang", flavour="sglang"),
                export_hf(ckpt, tmp_path / "hf", overwrite=True),  # the replacing path too
                copy_base_dir(base, tmp_path / "copied")]
    finally:
        os.umask(old)
    for out in outs:
        modes = _modes(out)
        assert "model.safetensors" in modes or "sub/weights.bin" in modes
        for name, mode in modes.items():
            want = 0o755 if (out / name).is_dir() else 0o644
            assert mode == want, f"{out.name}/{name}: {oct(mode)} != {oct(want)}"


# ---------------------------------------------------------------------------------- export_eagle

def expected_eagle_names(n_layer: int, flavour: str, qkv_bias: bool = False) -> set[str]:
    names = {"fc.weight", "embed_tokens.weight"} | ({"fc.bias"} if flavour == "sglang" else set())
    for i in range(n_layer):
        p = f"layers.{i}."
        names |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        names |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        names |= {p + "post_attention_layernorm.weight"} | ({p + "input_layernorm.weight"} if i else set())
        if qkv_bias:  # o_proj's is all zeros: attention_bias=true biases o_proj too
            names |= {p + f"self_attn.{x}_proj.bias" for x in "qkvo"}
    return names


@pytest.mark.parametrize("flavour", ["vllm", "sglang"])
def test_export_eagle_names_shapes_config(tmp_path, ckpt, flavour):
    out = export_eagle(ckpt, tmp_path / "draft", flavour=flavour)
    assert no_temp_leftovers(tmp_path)
    sd = load_file(str(out / "model.safetensors"))
    assert set(sd) == expected_eagle_names(1, flavour)
    assert not any(k.startswith("model.") or k.startswith("lm_head") for k in sd)
    _, model, module, _ = load_checkpoint(ckpt)
    d = model.cfg.dim
    assert sd["fc.weight"].shape == (d, 2 * d) and torch.equal(sd["fc.weight"], module.fc.weight)
    assert torch.equal(sd["embed_tokens.weight"], model.tok_embeddings.weight)
    assert sd["layers.0.self_attn.q_proj.weight"].shape == (4 * 16, d)
    assert sd["layers.0.self_attn.k_proj.weight"].shape == (2 * 16, d)
    assert sd["layers.0.mlp.gate_proj.weight"].shape == (96, d)
    assert torch.equal(sd["layers.0.mlp.up_proj.weight"], module.layers[0].feed_forward.w3.weight)
    assert torch.equal(sd["layers.0.post_attention_layernorm.weight"], module.layers[0].ffn_norm.weight)
    if flavour == "sglang":
        assert torch.equal(sd["fc.bias"], torch.zeros(d))

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == (["LlamaForCausalLM"] if flavour == "vllm" else ["LlamaForCausalLMEagle"])
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 1 and cfg["hidden_size"] == d and cfg["intermediate_size"] == 96
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["vocab_size"] == 320 and cfg["rope_theta"] == 20000.0 and cfg["rms_norm_eps"] == 1e-6
    assert cfg["tie_word_embeddings"] is False and cfg["hidden_act"] == "silu"
    # never true: the engines' llama.py read "bias" as an attention bias
    assert cfg.get("bias") is (False if flavour == "vllm" else None)
    assert "qkv_bias" not in cfg and cfg["attention_bias"] is False
    LlamaConfig.from_dict(cfg)  # a valid Llama config for the engines' transformers
    note = json.loads((out / "recyclegpt_export.json").read_text())
    assert note["exact"] is True and note["flavour"] == flavour


class EngineDraft(nn.Module):
    """What vLLM's EagleLlamaForCausalLM / SGLang's LlamaForCausalLMEagle build from the draft
    config (fc, Llama decoder layers, layer 0 without input norm, no final norm); the target's
    embedding and lm_head are supplied at run time, as the engines share them."""

    def __init__(self, config: dict, flavour: str):
        super().__init__()
        # engines: attention bias on q/k/v/o = config.attention_bias or config.bias
        bias = bool(config.get("attention_bias", False) or config.get("bias", False))
        c = LlamaConfig.from_dict({**config, "attention_bias": bias})
        c._attn_implementation = "sdpa"
        self.fc = nn.Linear(2 * c.hidden_size, c.hidden_size, bias=flavour == "sglang")
        self.layers = nn.ModuleList(LlamaDecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.layers[0].input_layernorm = nn.Identity()
        self.rope = LlamaRotaryEmbedding(c)

    def forward(self, embeds, hidden):
        x = self.fc(torch.cat([embeds, hidden], -1))
        pos = torch.arange(x.shape[1])[None]
        pe = self.rope(x, pos)
        for layer in self.layers:
            x = layer(x, position_ids=pos, position_embeddings=pe)
        return x


@pytest.mark.parametrize("flavour", ["vllm", "sglang"])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_eagle_draft_computes_the_module(tmp_path, flavour, qkv_bias):
    """Loading the exported tensors into the engines' draft structure reproduces the module."""
    ck = make_ckpt(tmp_path / "ck", qkv_bias=qkv_bias, tie=not qkv_bias,
                   module=ModuleConfig(n_layer=2, ffn_dim=48))
    out = export_eagle(ck, tmp_path / "draft", flavour=flavour)
    config = json.loads((out / "config.json").read_text())
    sd = load_file(str(out / "model.safetensors"))
    assert set(sd) == expected_eagle_names(2, flavour, qkv_bias)
    assert config["num_hidden_layers"] == 2 and config["intermediate_size"] == 48
    assert config.get("qkv_bias", False) == config["attention_bias"] == qkv_bias
    if qkv_bias:
        assert not sd["layers.1.self_attn.o_proj.bias"].any()
    draft = EngineDraft(config, flavour)
    sd.pop("embed_tokens.weight")  # engines share the target's
    draft.load_state_dict(sd, strict=True)

    _, model, module, tok = load_checkpoint(ck)
    idx = torch.tensor([tok.encode("def add(a, b):\n    return a + b, hello world")])
    with torch.no_grad():
        _, h = model(idx)
        ref_logits, ref_state = module(model, idx[:, 1:], h[:, :-1])
        state = draft(model.embed(idx[:, 1:]), h[:, :-1])
        torch.testing.assert_close(state, ref_state, atol=ATOL, rtol=0)
        torch.testing.assert_close(model.lm_head(state), ref_logits, atol=ATOL, rtol=0)
        # chained step: the engines feed the draft's own output state back in place of h
        ref2, _ = module(model, idx[:, 2:], ref_state[:, :-1])
        torch.testing.assert_close(model.lm_head(draft(model.embed(idx[:, 2:]), state[:, :-1])), ref2,
                                   atol=ATOL, rtol=0)


def test_eagle_without_embeddings_and_in_bf16(tmp_path, ckpt):
    out = export_eagle(ckpt, tmp_path / "d", include_embeddings=False, dtype="bfloat16")
    sd = load_file(str(out / "model.safetensors"))
    assert "embed_tokens.weight" not in sd and sd["fc.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(RecycleError, match="unknown EAGLE flavour"):
        export_eagle(ckpt, tmp_path / "e", flavour="trtllm")


@pytest.mark.parametrize("variant", [dict(input_norms=True), dict(final_norm=True)])
def test_variant_module_is_refused_unless_approximate(tmp_path, variant):
    ck = make_ckpt(tmp_path / "ck", module=ModuleConfig(n_layer=1, **variant))
    with pytest.raises(RecycleError, match="no exact EAGLE-1 form.*allow_approximate=True") as e:
        export_eagle(ck, tmp_path / "draft")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "draft").exists()
    out = export_eagle(ck, tmp_path / "draft", allow_approximate=True)
    note = json.loads((out / "recyclegpt_export.json").read_text())
    assert note["exact"] is False and "final norm is dropped" in note["approximation"]
    sd = load_file(str(out / "model.safetensors"))
    assert set(sd) == expected_eagle_names(1, "vllm")
    _, _, module, _ = load_checkpoint(ck)
    assert torch.equal(sd["fc.weight"], module.fc.weight) != bool(variant.get("input_norms"))


# ------------------------------------------------------------------------------ compatibility

def test_check_module_fits(tmp_path, ckpt):
    cfg, model, module, _ = load_checkpoint(ckpt)
    check_module_fits(cfg.model, cfg)
    check_module_fits(cfg.model, module.state_dict())
    eagle = export_eagle(ckpt, tmp_path / "d")
    check_module_fits(cfg.model, load_file(str(eagle / "model.safetensors")))
    check_module_fits(cfg.model, json.loads((eagle / "config.json").read_text()))

    narrow = ModelConfig(vocab_size=320, dim=32, n_layer=2, n_head=4, n_kv_head=2, ffn_dim=96)
    with pytest.raises(RecycleError, match=r"hidden size 64 != 32") as e:
        check_module_fits(narrow, module.state_dict())
    assert "\n" not in str(e.value)
    with pytest.raises(RecycleError, match="hidden size"):
        check_module_fits(narrow, cfg)
    bigger_vocab = ModelConfig(**{**cfg.model.__dict__, "vocab_size": 512})
    with pytest.raises(RecycleError, match=r"vocabulary 320 != 512"):
        check_module_fits(bigger_vocab, cfg)
    with pytest.raises(RecycleError, match=r"vocabulary 320 != 512"):
        check_module_fits(bigger_vocab, load_file(str(eagle / "model.safetensors")))
    with pytest.raises(RecycleError, match="no fc.weight"):
        check_module_fits(cfg.model, model.state_dict())


# ------------------------------------------------------------------------------ serving commands

def test_serving_commands():
    v = serving_command("vllm", target_path="out/hf", draft_path="out/eagle", num_speculative_tokens=4)
    argv = shlex.split(v)
    assert argv[:3] == ["vllm", "serve", "out/hf"]
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec == {"method": "eagle", "model": "out/eagle", "num_speculative_tokens": 4}
    s = shlex.split(serving_command("sglang", target_path="out/hf", draft_path="my draft",
                                    num_speculative_tokens=2))
    assert s[:3] == ["python", "-m", "sglang.launch_server"]
    flags = dict(zip(s[3::2], s[4::2], strict=True))
    assert flags["--model-path"] == "out/hf" and flags["--speculative-algorithm"] == "EAGLE"
    assert flags["--speculative-draft-model-path"] == "my draft"
    assert (flags["--speculative-num-steps"], flags["--speculative-eagle-topk"],
            flags["--speculative-num-draft-tokens"]) == ("2", "1", "3")
    text = serving_commands()
    assert "vllm serve" in text and "sglang.launch_server" in text
    with pytest.raises(RecycleError):
        serving_command("vllm", num_speculative_tokens=0)
