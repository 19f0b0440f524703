"""The generic backend: any transformers causal LM behind the FullModel interface (tiny random GPT-2, no
downloads). Hidden state = what the head reads; cached calls with rollback equal uncached passes;
`verify` greedy output equals `ar` at batch 1 and with rows at different positions."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from conftest import CORPUS_LINES  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2Config  # noqa: E402

from recyclegpt.config import ModuleConfig  # noqa: E402
from recyclegpt.decoding import GenerationConfig, generate  # noqa: E402
from recyclegpt.errors import RecycleError  # noqa: E402
from recyclegpt.hf.generic import (  # noqa: E402
    GenericCausalLM,
    load_base_tokenizer,
    load_generic,
    module_model_config,
)
from recyclegpt.module import RecyclableModule  # noqa: E402
from recyclegpt.tokenizer import Tokenizer  # noqa: E402

transformers.logging.set_verbosity_error()


def tiny_gpt2(vocab: int = 300, dim: int = 64, positions: int = 128, eos: int = 0, sharpen: float = 5.0):
    """A random GPT-2; `sharpen` scales its (tied) embeddings so its predictions are peaked, as a trained
    model's are (a module can learn them in a few steps; greedy ties are unlikely)."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=dim, n_layer=2, n_head=4, vocab_size=vocab, n_positions=positions,
                     bos_token_id=eos, eos_token_id=eos)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(sharpen)
    return model


def save_gpt2_dir(path, vocab: int = 300, dim: int = 64):
    tok = Tokenizer.train(CORPUS_LINES * 4, vocab)
    hf = tiny_gpt2(tok.vocab_size if vocab == 300 else vocab, dim=dim, eos=tok.eos_id)
    hf.save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def gpt2():
    hf = tiny_gpt2()
    cfg = module_model_config(hf.config, 300, 64)
    return hf, GenericCausalLM(hf, cfg, source="tiny-gpt2")


@torch.no_grad()
def test_hidden_state_is_what_the_head_reads(gpt2):
    hf, m = gpt2
    assert m.use_backbone and m.cache_mode == "dynamic"
    x = torch.randint(0, 300, (2, 11))
    ref = hf(x, output_hidden_states=True)
    logits, h = m(x)
    torch.testing.assert_close(h, ref.hidden_states[-1])  # GPT-2: after ln_f
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=0)
    assert m(x, logits=False)[0] is None
    assert (m.cfg.dim, m.cfg.vocab_size, m.cfg.max_seq_len) == (64, 300, 128)
    assert m.rope_cos.shape == (128, m.cfg.head_dim) and m.key_pos.shape == (128,)


@torch.no_grad()
def test_cached_calls_with_rollback_equal_uncached(gpt2):
    _, m = gpt2
    x = torch.randint(0, 300, (1, 14))
    _, ref = m(x)
    m.setup_caches(1)
    _, a = m(x[:, :6], torch.arange(6)[None])
    _, b = m(x[:, 6:10], torch.arange(6, 10)[None])  # like a verify pass over 4 tokens
    _, c = m(x[:, 8:14], torch.arange(8, 14)[None])  # two accepted: roll back to position 8
    torch.testing.assert_close(torch.cat([a, b[:, :2], c], 1), ref, atol=1e-5, rtol=0)
    _, d = m(x[:, :3], torch.arange(3)[None])  # position 0 starts the row over
    torch.testing.assert_close(d, ref[:, :3], atol=1e-5, rtol=0)
    with pytest.raises(RecycleError, match="holds only"):
        m(x[:, 5:6], torch.tensor([[5]]))
    with pytest.raises(RecycleError, match="contiguous"):
        m(x[:, 3:5], torch.tensor([[3, 5]]))


@torch.no_grad()
def test_uncroppable_cache_is_rebuilt_exactly(gpt2, monkeypatch):
    _, m = gpt2
    x = torch.randint(0, 300, (1, 12))
    _, ref = m(x)

    def refuse(*_a, **_k):
        raise RuntimeError("cannot crop")

    m.setup_caches(1)
    m(x[:, :7], torch.arange(7)[None])
    monkeypatch.setattr(type(m.caches.rows[0].cache), "crop", refuse)
    _, h = m(x[:, 5:12], torch.arange(5, 12)[None])
    torch.testing.assert_close(h, ref[:, 5:], atol=1e-5, rtol=0)
    assert m.caches.rows[0].rebuilds == 1
    monkeypatch.undo()
    m.cache_mode = "recompute"
    try:
        _, h = m(x[:, 9:12], torch.arange(9, 12)[None])
        torch.testing.assert_close(h, ref[:, 9:], atol=1e-5, rtol=0)
    finally:
        m.cache_mode = "dynamic"


@pytest.mark.parametrize("mode", ["verify", "recycle"])
def test_modes_on_the_generic_backend(gpt2, mode):
    hf, m = gpt2
    torch.manual_seed(1)
    module = RecyclableModule(m.cfg, ModuleConfig()).eval()
    prompts = [[5, 17, 99, 4, 250], [7, 8, 9]]
    ar1 = [generate(m, module, [p], GenerationConfig(mode="ar", max_new_tokens=12)).tokens[0] for p in prompts]
    with torch.no_grad():  # ar on the generic backend is transformers' own greedy decoding
        ref = hf.generate(torch.tensor([prompts[0]]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert ref[0, len(prompts[0]):].tolist() == ar1[0]
    arB = generate(m, module, prompts, GenerationConfig(mode="ar", max_new_tokens=12)).tokens
    assert arB == ar1  # rows at different positions, run row by row
    res = generate(m, module, prompts, GenerationConfig(mode=mode, max_new_tokens=12, k=3))
    if mode == "verify":
        assert res.tokens == ar1
    else:
        assert res.stats.tau > 1.5 and all(len(t) == 12 for t in res.tokens)


def test_module_config_choices():
    hf = tiny_gpt2()
    c = module_model_config(hf.config, 300, 64)
    assert (c.n_head, c.n_kv_head, c.ffn_dim, c.max_seq_len) == (4, 4, 192, 128)
    hf.config.n_head = 3  # 64 / 3 does not split: fall back to even heads
    c = module_model_config(hf.config, 300, 64, max_seq_len=64)
    assert c.dim % c.n_head == 0 and c.head_dim % 2 == 0 and c.max_seq_len == 64
    with pytest.raises(RecycleError, match="exceeds the base model's context"):
        module_model_config(hf.config, 300, 64, max_seq_len=4096)


def test_load_dir_tokenizer_and_refusals(tmp_path):
    d = save_gpt2_dir(tmp_path / "gpt2")
    m = load_generic(d)
    assert isinstance(m, GenericCausalLM) and m.cfg.vocab_size == 300
    tok = load_base_tokenizer(d)
    assert tok.eos_id == 0 and tok.decode(tok.encode("def add(a, b):")) == "def add(a, b):"
    with pytest.raises(RecycleError, match="not a transformers model directory"):
        load_generic(tmp_path)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text((d / "config.json").read_text())
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(RecycleError, match="safetensors only"):
        load_generic(tmp_path / "pickled")


def test_head_that_is_not_a_plain_linear_map_is_refused():
    hf = tiny_gpt2()
    hf.register_forward_hook(lambda _m, _i, out: out.__setitem__("logits", out["logits"] * 2) or out)
    with pytest.raises(RecycleError, match="soft-capping or scaling"):
        GenericCausalLM(hf, module_model_config(hf.config, 300, 64), source="scaled")


@pytest.mark.parametrize("arch", ["gpt_neox", "gemma2"])
def test_other_architectures(arch):
    """GPT-NeoX (rotary, parallel residual); Gemma 2 (logit soft-capping applied in lm_head, sliding-window
    layers rolled back past the window)."""
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  vocab_size=300, max_position_embeddings=128)
    if arch == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(**common)
    else:
        cfg = transformers.Gemma2Config(**common, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                        final_logit_softcapping=2.0)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        hf.get_input_embeddings().weight.mul_(5)
    m = GenericCausalLM(hf, module_model_config(hf.config, 300, 64, max_seq_len=64), source=arch)
    assert m.cache_mode == "dynamic"
    torch.manual_seed(1)
    module = RecyclableModule(m.cfg, ModuleConfig()).eval()
    prompt = [5, 17, 99, 4, 250, 3, 8, 9, 10, 11, 12, 13]
    ar = generate(m, module, [prompt], GenerationConfig(mode="ar", max_new_tokens=20)).tokens
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    assert ref[0, len(prompt):].tolist() == ar[0]
    assert generate(m, module, [prompt], GenerationConfig(mode="verify", max_new_tokens=20, k=3)).tokens == ar


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_verify_equals_ar_in_the_default_dtype(tmp_path, seed):
    """A checkpoint attached to a transformers base loads in its default dtype (fp32 for the generic backend:
    transformers' bf16 kernels round a pass by how many tokens it holds), where `verify` equals `ar`."""
    from recyclegpt import RecycleGPT
    from recyclegpt.checkpoint import save_checkpoint
    from recyclegpt.config import Config, TokenizerConfig
    from recyclegpt.hf.generic import generic_base_ref

    tok = Tokenizer.train(CORPUS_LINES * 4, 300)
    torch.manual_seed(seed)
    cfg = transformers.GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=tok.vocab_size, max_position_embeddings=128)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        hf.get_input_embeddings().weight.mul_(3)
    hf.save_pretrained(tmp_path / "base")
    base = load_generic(tmp_path / "base")
    module = RecyclableModule(base.cfg, ModuleConfig()).eval()
    ck = Config(model=base.cfg, module=ModuleConfig(), tokenizer=TokenizerConfig(vocab_size=tok.vocab_size),
                base=generic_base_ref(base))
    save_checkpoint(tmp_path / "ckpt", ck, None, module, tok)
    m = RecycleGPT.from_pretrained(tmp_path / "ckpt")  # device and dtype "auto"
    assert m.dtype == torch.float32 and isinstance(m.model, GenericCausalLM)
    prompts = ["def add(a, b):", "The quick brown fox", "for i in range(10):", "In the morning"]
    ar = m.generate_with_stats(prompts, mode="ar", max_new_tokens=32, eos_id=None).tokens
    assert m.generate_with_stats(prompts, mode="verify", k=3, max_new_tokens=32, eos_id=None).tokens == ar
