"""`recyclegpt attach`: module-only self-distillation on a frozen base (tiny random models, no downloads).

Target alignment by hand; acceptance by position by hand; a GPT-2 base through the generic backend
(loss drops, `verify` == `ar` from the output directory, --resume continues exactly); a Llama base
natively; a recyclegpt checkpoint as the base with its own module; bases and modules that do not fit.
"""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from conftest import tiny_pair  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_generic import save_gpt2_dir  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from recyclegpt import RecycleGPT  # noqa: E402
from recyclegpt.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from recyclegpt.cli import main  # noqa: E402
from recyclegpt.config import Config, ModuleConfig, TokenizerConfig, TrainConfig  # noqa: E402
from recyclegpt.data import prepare_tokens, resolve_files  # noqa: E402
from recyclegpt.errors import RecycleError  # noqa: E402
from recyclegpt.hf.generic import GenericCausalLM  # noqa: E402
from recyclegpt.model import FullModel  # noqa: E402
from recyclegpt.module import RecyclableModule  # noqa: E402
from recyclegpt.tokenizer import Tokenizer  # noqa: E402
from recyclegpt.training import JointModel, read_metrics  # noqa: E402
from recyclegpt.training.attach import (  # noqa: E402
    AttachOptions,
    acceptance_by_position,
    attach,
    distill_targets,
    evaluate_attach,
    expected_tau,
    load_base,
    sampled_acceptance,
)

transformers.logging.set_verbosity_error()
TRAIN = dict(bf16=False, batch_size=4, seq_len=32, eval_every=1000, save_every=1000, eval_batches=1,
             warmup_steps=2, lr=3e-3)


def opts(base, data, out, **kw) -> AttachOptions:
    o = dict(base=str(base), data=[str(data)], out=str(out), progress=False, val_prompts=0, max_steps=6,
             overrides=dict(TRAIN))
    o.update(kw)
    return AttachOptions(**o)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_gpt2_dir(tmp_path_factory.mktemp("base") / "gpt2")


# ---- targets by hand ---------------------------------------------------------------------------

@torch.no_grad()
def test_distill_targets_alignment_by_hand():
    """x = [5, 6, 7, 8, 9], y_t = the base's argmax at t (its guess for x_{t+1}). Module step 1 at t reads
    (h_t, x_{t+1}) and must be scored on y_{t+1}; step 2 at t reads (g_t, x_{t+2}) and is scored on y_{t+2}."""
    cfg, model, module = tiny_pair(7)
    x = torch.tensor([[5, 6, 7, 8, 9]])
    logits, h = model(x)
    y = logits.argmax(-1)[0].tolist()
    targets = distill_targets(logits, x)
    assert targets[0].tolist() == [5, y[0], y[1], y[2], y[3]]
    joint = JointModel(model, module, recycle_weight=1.0, unroll_steps=2, unroll_decay=0.5, train_full=False)
    loss, m = joint(x, targets)
    # step 1 by hand: one causal module pass over the pairs (h_0, 6), (h_1, 7), (h_2, 8)
    l1, _ = module(model, torch.tensor([[6, 7, 8]]), h[:, :3])
    ce1 = F.cross_entropy(l1[0], torch.tensor([y[1], y[2], y[3]]))
    torch.testing.assert_close(m["ce_module_1"], ce1)
    # step 2 (the unrolled chain; equal to decode-time chaining, see test_training) on y_{t+2}
    step2 = module.forward_unrolled(model, x, h, 2)[1]
    ce2 = F.cross_entropy(step2[0], torch.tensor([y[2], y[3]]))
    torch.testing.assert_close(m["ce_module_2"], ce2)
    torch.testing.assert_close(loss, ce1 + 0.5 * ce2)
    # a precomputed h gives the same loss without a second base pass
    torch.testing.assert_close(joint(x, targets, h=h)[0], loss)
    # soft targets: (1-w)·CE(y) + w·CE(p_base)
    w = 0.25
    soft_loss, sm = joint(x, distill_targets(logits, x, w), h=h)
    p = logits[0].softmax(-1)
    ce_soft = -(p[[1, 2, 3]] * l1[0].log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(sm["ce_module_1"], (1 - w) * ce1 + w * ce_soft)


def test_acceptance_by_position_by_hand():
    V = 4
    pred = torch.tensor([[0, 1, 2, 3, 0, 1]])  # T = 6; K = 2 steps cover t = 0..2 (L = T - K - 1 = 3)

    def onehot(ids):
        return F.one_hot(torch.tensor([ids]), V).float()

    s1 = onehot([1, 0, 3, 0])  # step 1 at t guesses pred[t+1] = 1, 2, 3: right at t=0 and t=2
    s2 = onehot([2, 0, 1])  # step 2 at t guesses pred[t+2] = 2, 3, 0: right at t=0 only
    rates, counts = acceptance_by_position([s1, s2], pred)
    assert counts == [3, 2] and rates == pytest.approx([2 / 3, 1 / 2])
    assert expected_tau(rates) == pytest.approx(1 + 2 / 3 + 2 / 3 * 1 / 2)


def test_sampled_acceptance_is_the_overlap_of_the_two_distributions():
    # base logits [1, T=4, V=2]; step 1 at t reads base index t+1, step 2 at t reads base index t+2
    p = torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]])
    q1 = torch.tensor([[[0.9, 0.1], [0.6, 0.4]]])  # = p at index 1; overlap 0.2 + 0.4 with p at index 2
    q2 = torch.tensor([[[0.0, 1.0]]])  # overlap 0.8 with p at index 2
    rates = sampled_acceptance([q1.log(), q2.clamp_min(1e-30).log()], p.log())
    assert rates == pytest.approx([(1.0 + 0.6) / 2, 0.8], abs=1e-6)


# ---- GPT-2 through the generic backend ---------------------------------------------------------

def test_attach_gpt2_lowers_loss_and_verify_equals_ar(gpt2_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["attach", str(gpt2_dir), "--data", str(text_dir), "--out", str(out), "--max-steps", "24",
               "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--fp32", "--no-progress",
               "--eval-every", "12", "--save-every", "12", "--val-prompts", "2", "--seed", "3"])
    assert rc == 0
    ck = out / "checkpoint"
    assert not (ck / "model.safetensors").exists()  # the base is referenced, not copied
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["base"]["path"] == str(gpt2_dir.resolve()) and cfg["base"]["model_type"] == "gpt2"
    evals = read_metrics(out, "eval")
    assert [e["step"] for e in evals] == [12, 24]
    assert len(evals[-1]["val_acceptance_by_position"]) == 3 and "val_decode_tau" in evals[-1]
    assert all(0 < r <= 1 for r in evals[-1]["val_sampled_acceptance_by_position"])

    # the module's distillation loss went down from its (seeded) initial state
    cfg_, base, module, tok = load_checkpoint(out)
    assert isinstance(base, GenericCausalLM)
    torch.manual_seed(3)
    fresh = RecyclableModule(cfg_.model, cfg_.module)
    val = prepare_tokens(resolve_files([str(text_dir)]), tok, out / "tokens", progress=False).val
    tc = TrainConfig(seq_len=32, batch_size=4, eval_batches=2, unroll_steps=2)
    before = evaluate_attach(base, fresh, val, tc, nullcontext, 2)
    after = evaluate_attach(base, module, val, tc, nullcontext, 2)
    assert after["val_ce_module_1"] < before["val_ce_module_1"] - 1.0
    assert after["val_ce_module_2"] < before["val_ce_module_2"]

    # generate from the run directory: verify is token-identical to ar (batch 1 and batch 2)
    m = RecycleGPT.from_pretrained(out, device="cpu", dtype="float32")
    prompts = ["def add(a, b):", "The quick brown fox jumps over"]
    ar = [m.generate_with_stats([p], mode="ar", max_new_tokens=16).tokens[0] for p in prompts]
    for k in (2, 3):
        assert m.generate_with_stats(prompts, mode="verify", k=k, max_new_tokens=16).tokens == ar
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "def add(a, b):", "--mode", "verify", "--dtype", "float32",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("def add(a, b):")


def test_resume_continues_exactly(gpt2_dir, text_dir, tmp_path):
    straight = tmp_path / "straight"
    attach(opts(gpt2_dir, text_dir, straight))
    split = tmp_path / "split"
    attach(opts(gpt2_dir, text_dir, split, stop_at_step=3))
    assert json.loads((split / "checkpoint" / "train_state.json").read_text())["step"] == 3
    with pytest.raises(RecycleError, match="already holds a run"):
        attach(opts(gpt2_dir, text_dir, split))
    with pytest.raises(RecycleError, match="different run"):
        attach(opts(gpt2_dir, text_dir, split, resume=True, distill_kl=0.5))
    attach(opts(gpt2_dir, text_dir, split, resume=True))
    assert json.loads((split / "checkpoint" / "train_state.json").read_text())["step"] == 6
    a = load_file(str(straight / "checkpoint" / "module.safetensors"))
    b = load_file(str(split / "checkpoint" / "module.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


# ---- other bases -------------------------------------------------------------------------------

def test_llama_base_loads_natively(tmp_path, text_dir):
    torch.manual_seed(0)
    tok = Tokenizer.train(["def add(a, b):\n    return a + b\n", "the quick brown fox"] * 8, 300)
    hf = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
        intermediate_size=96, max_position_embeddings=64, eos_token_id=tok.eos_id))
    base = tmp_path / "llama"
    hf.save_pretrained(base)
    tok.save(base / "tokenizer.json")
    out = tmp_path / "run"
    attach(opts(base, text_dir, out, max_steps=4, overrides={**TRAIN, "save_every": 2}))
    cfg, model, module, _ = load_checkpoint(out)
    assert isinstance(model, FullModel) and cfg.base is None and cfg.model.max_seq_len == 64
    m = RecycleGPT(cfg, model, module, Tokenizer.load(out / "checkpoint" / "tokenizer.json"))
    ar = m.generate_with_stats("def add(a, b):", mode="ar", max_new_tokens=12).tokens
    assert m.generate_with_stats("def add(a, b):", mode="verify", max_new_tokens=12).tokens == ar
    with torch.no_grad():
        x = torch.randint(0, 300, (1, 9))
        torch.testing.assert_close(model(x)[0], hf(x).logits, atol=1e-5, rtol=0)


def _native_ckpt(path, dim=64, vocab=512):
    cfg, model, module = tiny_pair(2, dim=dim, vocab_size=vocab)
    tok = Tokenizer.train(["def add(a, b):\n    return a + b\n", "the quick brown fox"] * 8, 300)
    cfg = Config(model=cfg.model, module=ModuleConfig(), tokenizer=TokenizerConfig(vocab_size=vocab),
                 eos_token_id=tok.eos_id)
    return save_checkpoint(path, cfg, model, module, tok)


def test_checkpoint_base_trains_its_own_module(tmp_path, text_dir, gpt2_dir):
    src = _native_ckpt(tmp_path / "ckpt")
    out = tmp_path / "run"
    attach(opts(src, text_dir, out, init_from_checkpoint="", max_steps=2,
                overrides={**TRAIN, "lr": 1e-9, "warmup_steps": 1}))
    before = load_file(str(src / "module.safetensors"))
    after = load_file(str(out / "checkpoint" / "module.safetensors"))
    for k in before:  # started from the checkpoint's module (a 1e-9 learning rate barely moves it)
        torch.testing.assert_close(after[k], before[k], atol=1e-6, rtol=0)
    base = load_file(str(src / "model.safetensors"))
    copied = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert base.keys() == copied.keys() and all(torch.equal(base[k], copied[k]) for k in base)
    with pytest.raises(RecycleError, match="needs BASE to be a recyclegpt checkpoint"):
        attach(opts(gpt2_dir, text_dir, tmp_path / "r2", init_from_checkpoint=""))


def test_base_and_module_that_do_not_fit(tmp_path, gpt2_dir, text_dir):
    with pytest.raises(RecycleError, match=r"module does not fit this model: vocabulary 512 != 300"):
        attach(opts(gpt2_dir, text_dir, tmp_path / "a", init_from_checkpoint=str(_native_ckpt(tmp_path / "v"))))
    narrow = _native_ckpt(tmp_path / "n", dim=32, vocab=300)
    with pytest.raises(RecycleError, match=r"hidden size 32 != 64") as e:
        attach(opts(gpt2_dir, text_dir, tmp_path / "b", init_from_checkpoint=str(narrow)))
    assert "\n" not in str(e.value)
    # a generic checkpoint whose base directory was replaced by a model of another width
    out = tmp_path / "run"
    attach(opts(gpt2_dir, text_dir, out, max_steps=1))
    cfg = json.loads((out / "checkpoint" / "config.json").read_text())
    other = save_gpt2_dir(tmp_path / "other", dim=32)
    cfg["base"]["path"] = str(other)
    (out / "checkpoint" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RecycleError, match=r"hidden size 32 != 64"):
        RecycleGPT.from_pretrained(out, device="cpu", dtype="float32")
    cfg["base"]["path"] = str(tmp_path / "gone")
    (out / "checkpoint" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RecycleError, match="base model is not at"):
        load_checkpoint(out)
    assert main(["attach", str(tmp_path / "nothing"), "--data", str(text_dir), "--out", str(tmp_path / "c")]) == 2


# ---- export ------------------------------------------------------------------------------------

def test_export_cli_prints_serving_commands(tmp_path, gpt2_dir, text_dir, capsys):
    src = _native_ckpt(tmp_path / "ckpt", vocab=320)
    assert main(["export", str(src), "--format", "all", "--out", str(tmp_path / "x")]) == 0
    text = capsys.readouterr().out
    assert f"vllm serve {tmp_path / 'x' / 'hf'}" in text and str(tmp_path / "x" / "eagle-sglang") in text
    assert (tmp_path / "x" / "hf" / "config.json").is_file()
    assert main(["export", str(src), "--format", "eagle", "--flavour", "sglang", "--out", str(tmp_path / "e")]) == 0
    assert "--speculative-draft-model-path" in capsys.readouterr().out
    assert main(["export", str(src), "--format", "hf", "--out", str(tmp_path / "e")]) == 2  # exists
    # an attached GPT-2: the full model is (a copy of) its transformers directory
    out = tmp_path / "run"
    attach(opts(gpt2_dir, text_dir, out, max_steps=1))
    assert main(["export", str(out), "--format", "hf", "--out", str(tmp_path / "g")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert main(["export", str(out), "--format", "eagle", "--out", str(tmp_path / "ge")]) == 0
    assert f"vllm serve {gpt2_dir.resolve()}" in capsys.readouterr().out


def test_llama_the_native_model_cannot_express_falls_back_to_generic(tmp_path):
    tok = Tokenizer.train(["def add(a, b):\n    return a + b\n", "the quick brown fox"] * 8, 300)
    hf = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
        intermediate_size=96, max_position_embeddings=64, eos_token_id=tok.eos_id,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}))
    hf.save_pretrained(tmp_path / "llama")
    tok.save(tmp_path / "llama" / "tokenizer.json")
    lb = load_base(tmp_path / "llama")
    assert lb.backend == "generic" and isinstance(lb.model, GenericCausalLM) and lb.base_ref is not None
    with pytest.raises(RecycleError, match="rope type 'linear'"):
        load_base(tmp_path / "llama", backend="native")
    assert load_base(tmp_path / "llama", backend="generic").backend == "generic"
