"""Bad input, class by class (issue 15): every one ends in one line, exit code 2, no traceback, no file changed.

1. checkpoint config.json values of the wrong type, zero, negative, missing or unknown;
2. text that is not valid Unicode (command line) and API inputs of the wrong type;
4. non-finite and out-of-range numbers: every numeric option, and non-finite weights;
8. silent surprises: a tokenizer larger than the model, max_new_tokens beyond the context, two prompts
   to `stream`, messages of the command line that name API arguments instead of flags.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import CORPUS_LINES, load_benchmark, tiny_pair
from safetensors.torch import load_file, save_file

from recyclegpt import RecycleGPT
from recyclegpt.checkpoint import load_checkpoint, save_checkpoint
from recyclegpt.cli import main
from recyclegpt.config import ModuleConfig
from recyclegpt.errors import RecycleError, RecycleWarning
from recyclegpt.module import RecyclableModule
from recyclegpt.tokenizer import Tokenizer

# ---- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("validation")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS_LINES * 20, vocab_size=300)


@pytest.fixture(scope="module")
def ckpt(root, tok) -> Path:
    """A tiny checkpoint (vocabulary 512, context 256, tokenizer of 300 tokens)."""
    cfg, model, module = tiny_pair(11)
    cfg.eos_token_id = tok.eos_id
    return save_checkpoint(root / "ckpt", cfg, model, module, tok)


@pytest.fixture(scope="module")
def data(root) -> Path:
    d = root / "data"
    d.mkdir()
    (d / "a.txt").write_text("\n".join(CORPUS_LINES * 4))
    return d


@pytest.fixture(scope="module")
def m(ckpt) -> RecycleGPT:
    return RecycleGPT.from_pretrained(ckpt, device="cpu", dtype="float32")


def hashes(*roots: Path) -> dict[str, str]:
    out = {}
    for r in roots:
        files = [r] if r.is_file() else sorted(p for p in r.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(capsys, args: list[str]) -> tuple[int, str, str]:
    """main(args) -> (exit code, stdout, stderr); an argparse SystemExit counts as its code."""
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def cli_error(capsys, args: list[str], *watched: Path) -> str:
    """Run a bad command line: exit 2, exactly one `error:` line on stderr, no traceback, watched files
    byte-identical. Returns the line."""
    before = hashes(*watched)
    rc, _, err = run_cli(capsys, args)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert hashes(*watched) == before
    return lines[0]


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


def copy_ckpt(ckpt: Path, dst: Path) -> Path:
    shutil.copytree(ckpt, dst)
    return dst


# ---- 1. checkpoint config values --------------------------------------------------------------

FAULTS = load_benchmark("faults")  # benchmarks/faults.py breaks configs the same way
DELETE = FAULTS.DELETE

CONFIG_CASES = [  # (path in config.json, bad value or DELETE, field the message must name)
    ("model.n_kv_head", 0, "model.n_kv_head"),
    ("model.n_kv_head", -2, "model.n_kv_head"),
    ("model.n_kv_head", "2", "model.n_kv_head"),
    ("model.n_kv_head", 2.0, "model.n_kv_head"),
    ("model.n_kv_head", None, "model.n_kv_head"),
    ("model.n_kv_head", DELETE, "model.n_kv_head"),
    ("model.n_kv_head", 3, "model.n_kv_head"),  # n_head 4 is not divisible by 3
    ("model.n_head", 0, "model.n_head"),
    ("model.n_head", 3, "model.n_head"),  # dim 64 is not divisible by 3
    ("model.dim", 0, "model.dim"),
    ("model.dim", -64, "model.dim"),
    ("model.dim", True, "model.dim"),
    ("model.dim", 10 ** 12, "model.dim"),
    ("model.dim", [64], "model.dim"),
    ("model.vocab_size", 0, "model.vocab_size"),
    ("model.vocab_size", "512", "model.vocab_size"),
    ("model.n_layer", 0, "model.n_layer"),
    ("model.n_layer", DELETE, "model.n_layer"),
    ("model.ffn_dim", -1, "model.ffn_dim"),
    ("model.max_seq_len", 0, "model.max_seq_len"),
    ("model.max_seq_len", 2 ** 40, "model.max_seq_len"),
    ("model.rope_theta", float("nan"), "model.rope_theta"),
    ("model.rope_theta", float("inf"), "model.rope_theta"),
    ("model.rope_theta", 0, "model.rope_theta"),
    ("model.rope_theta", -1.0, "model.rope_theta"),
    ("model.rope_theta", "10000", "model.rope_theta"),
    ("model.norm_eps", 0, "model.norm_eps"),
    ("model.norm_eps", float("-inf"), "model.norm_eps"),
    ("model.norm_eps", 5, "model.norm_eps"),
    ("model.tie_embeddings", "yes", "model.tie_embeddings"),
    ("model.tie_embeddings", 1, "model.tie_embeddings"),
    ("model.qkv_bias", None, "model.qkv_bias"),
    ("model.bogus", 1, "model.bogus"),
    ("module.n_layer", 0, "module.n_layer"),
    ("module.n_layer", 1.5, "module.n_layer"),
    ("module.ffn_dim", 0, "module.ffn_dim"),
    ("module.ffn_dim", "x", "module.ffn_dim"),
    ("module.input_norms", 0, "module.input_norms"),
    ("module.final_norm", DELETE, "module.final_norm"),
    ("tokenizer.vocab_size", 0, "tokenizer.vocab_size"),
    ("tokenizer.eos_token", 5, "tokenizer.eos_token"),
    ("tokenizer.eos_token", DELETE, "tokenizer.eos_token"),
    ("eos_token_id", -1, "eos_token_id"),
    ("eos_token_id", "0", "eos_token_id"),
    ("eos_token_id", 10 ** 9, "eos_token_id"),
    ("eos_token_id", DELETE, "eos_token_id"),
    ("format_version", 0, "format_version"),
    ("format_version", "1", "format_version"),
    ("format_version", 99, "format_version"),
    ("format_version", DELETE, "format_version"),
    ("model", DELETE, "model"),
    ("model", [], "model"),
    ("module", 5, "module"),
    ("tokenizer", None, "tokenizer"),
    ("bogus", {}, "bogus"),
    ("base", 5, "base"),
    ("base", {"path": 3}, "base"),
]


@pytest.mark.parametrize("dotted, value, field", CONFIG_CASES,
                         ids=[f"{d}={'DELETE' if v is DELETE else v!r}"[:40] for d, v, _ in CONFIG_CASES])
def test_bad_config_value_is_one_line(ckpt, tmp_path, capsys, dotted, value, field):
    ck = copy_ckpt(ckpt, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    FAULTS.set_field(cfg, dotted, value)
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RecycleError) as e:
        load_checkpoint(ck)
    msg = one_line(e)
    assert str(ck / "config.json") in msg and field in msg, msg
    line = cli_error(capsys, ["generate", str(ck), "--prompt", "x"], ck)
    assert field in line


@pytest.mark.parametrize("text", ["[1, 2]", "5", "null", '"config"'])
def test_config_that_is_not_an_object(ckpt, tmp_path, text):
    ck = copy_ckpt(ckpt, tmp_path / "ck")
    (ck / "config.json").write_text(text)
    with pytest.raises(RecycleError) as e:
        load_checkpoint(ck)
    assert "config.json" in one_line(e)


def test_shipped_and_saved_configs_still_load(ckpt):
    from recyclegpt.checkpoint import load_config
    from recyclegpt.demo import shipped_checkpoint

    assert load_config(shipped_checkpoint()).model.dim == 384
    cfg = load_config(ckpt)
    assert cfg.module.ffn_dim is None and "base" not in json.loads((ckpt / "config.json").read_text())


# ---- 2. text that is not valid Unicode; API inputs of the wrong type ----------------------------

BAD_TEXT = ["\udcff", "abc\udc80", "\udcc3", "ok \udcfe\udcff"]  # command-line bytes that are not UTF-8


@pytest.mark.parametrize("text", BAD_TEXT)
@pytest.mark.parametrize("flag", ["--prompt", "--stop"])
def test_cli_text_not_utf8(ckpt, capsys, text, flag):
    args = ["generate", str(ckpt), "--prompt", "x", flag, text]
    line = cli_error(capsys, args, ckpt)
    assert flag in line and "UTF-8" in line


@pytest.mark.parametrize("args", [
    ["train", "--data", "{data}", "--out", "{out}", "--text-field", "\udcff"],
    ["attach", "{ckpt}", "--data", "{data}", "--out", "{out}", "--text-field", "f\udce9"],
    ["serve", "{ckpt}", "--model-name", "\udcff"],
    ["serve", "{ckpt}", "--host", "\udcff"],
])
def test_cli_other_text_flags_not_utf8(ckpt, data, tmp_path, capsys, args):
    subst = {"{data}": str(data), "{out}": str(tmp_path / "out"), "{ckpt}": str(ckpt)}
    line = cli_error(capsys, [subst.get(a, a) for a in args], ckpt, data)
    assert "UTF-8" in line
    assert not (tmp_path / "out").exists()


def test_cli_path_that_is_not_utf8_prints(tmp_path, capsys):
    line = cli_error(capsys, ["generate", str(tmp_path / "no\udcffpe"), "--prompt", "x"])
    assert "checkpoint not found" in line and "no\\xffpe" in line


BAD_PROMPTS = [b"def f", bytearray(b"x"), None, 5, 3.5, True, ["a", 3], ["a", None], [b"x"], {"a": 1},
               [], ("a", ["b"]), "\udcff", ["ok", "\ud800"], iter(["a"])]


@pytest.mark.parametrize("prompts", BAD_PROMPTS, ids=[repr(p)[:20] for p in BAD_PROMPTS])
@pytest.mark.parametrize("method", ["generate", "generate_with_stats", "stream"])
def test_api_prompts_of_the_wrong_type(m, method, prompts):
    with pytest.raises(RecycleError) as e:
        out = getattr(m, method)(prompts, max_new_tokens=2)
        if method == "stream":
            next(out)
    msg = one_line(e)
    assert "string" in msg or "Unicode" in msg or "prompt" in msg, msg


@pytest.mark.parametrize("stop", [b"x", 3, [3], ["a", None], "\udcff", [""]])
def test_api_stop_of_the_wrong_type(m, stop):
    with pytest.raises(RecycleError) as e:
        m.generate("def f", max_new_tokens=2, stop=stop)
    assert "stop" in one_line(e)


def test_api_stream_checks_when_called(m):
    with pytest.raises(RecycleError, match="one prompt"):
        m.stream(["a", "b"], max_new_tokens=2)  # refused at once, not at the first next()
    assert "".join(m.stream(["def f"], mode="ar", max_new_tokens=3)) == m.generate("def f", mode="ar",
                                                                                    max_new_tokens=3)[0]


# ---- 4. non-finite and out-of-range numbers -------------------------------------------------------

GENERATE_NUMBERS = [
    ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"), ("--temperature", "-inf"),
    ("--temperature", "hot"), ("--top-p", "0"), ("--top-p", "2"), ("--top-p", "nan"), ("--top-p", "-0.5"),
    ("--top-k", "-1"), ("--top-k", "1.5"), ("--max-new-tokens", "-1"), ("--max-new-tokens", "nan"),
    ("--max-new-tokens", "1e3"), ("--k", "0"), ("--k", "-3"), ("--k", "65"), ("--k", str(10 ** 12)),
    ("--seed", str(2 ** 63)), ("--seed", str(-2 ** 63 - 1)), ("--seed", "x"), ("--seed", "1.5"),
    ("--temperature", "1e39"), ("--top-k", str(2 ** 63)),
]


@pytest.mark.parametrize("flag, value", GENERATE_NUMBERS)
def test_generate_numbers(ckpt, capsys, flag, value):
    line = cli_error(capsys, ["generate", str(ckpt), "--prompt", "x", flag, value], ckpt)
    assert flag in line


TRAIN_NUMBERS = [
    ("--lr", "nan"), ("--lr", "0"), ("--lr", "-1"), ("--lr", "inf"), ("--max-minutes", "nan"),
    ("--max-minutes", "-1"), ("--max-minutes", "inf"), ("--max-minutes", "0"), ("--val-fraction", "1"),
    ("--val-fraction", "-0.1"), ("--val-fraction", "nan"), ("--recycle-weight", "nan"),
    ("--recycle-weight", "-1"), ("--recycle-weight", "inf"), ("--seq-len", "0"), ("--batch-size", "0"),
    ("--batch-size", "-2"), ("--vocab-size", "0"), ("--vocab-size", str(10 ** 9)), ("--max-steps", "0"),
    ("--seed", "-5"), ("--grad-accum", "0"), ("--unroll-steps", "0"), ("--eval-every", "0"),
    ("--save-every", "0"), ("--module-layers", "0"),
]


@pytest.mark.parametrize("flag, value", TRAIN_NUMBERS)
def test_train_numbers(data, tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    line = cli_error(capsys, ["train", "--data", str(data), "--out", str(out), "--preset", "tiny", flag, value],
                     data)
    assert flag in line
    assert not out.exists()


ATTACH_NUMBERS = [("--distill-kl", "2"), ("--distill-kl", "nan"), ("--distill-kl", "-0.1"),
                  ("--val-prompts", "-1"), ("--lr", "inf"), ("--max-seq-len", "0"), ("--val-fraction", "1"),
                  ("--max-minutes", "nan"), ("--seed", "-1")]


@pytest.mark.parametrize("flag, value", ATTACH_NUMBERS)
def test_attach_numbers(ckpt, data, tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    line = cli_error(capsys, ["attach", str(ckpt), "--data", str(data), "--out", str(out), flag, value],
                     ckpt, data)
    assert flag in line
    assert not out.exists()


OTHER_NUMBERS = [
    ["eval", "{ckpt}", "--seq-len", "0"], ["eval", "{ckpt}", "--max-tokens", "-1"],
    ["eval", "{ckpt}", "--agreement-tokens", "-1"], ["bench", "{ckpt}", "--temperature", "nan"],
    ["bench", "{ckpt}", "--num-prompts", "-1"], ["bench", "{ckpt}", "--max-new-tokens", "0"],
    ["bench", "{ckpt}", "--repeats", "0"], ["bench", "{ckpt}", "--seed", "-1"], ["bench", "{ckpt}", "--k", "0"],
    ["bench", "{ckpt}", "--batch-size", "0"], ["serve", "{ckpt}", "--port", "0"],
    ["serve", "{ckpt}", "--port", "70000"], ["serve", "{ckpt}", "--request-timeout", "nan"],
    ["serve", "{ckpt}", "--request-timeout", "0"], ["serve", "{ckpt}", "--request-timeout", "inf"],
    ["serve", "{ckpt}", "--slots", "0"], ["serve", "{ckpt}", "--slots", str(10 ** 9)],
    ["serve", "{ckpt}", "--max-k", "0"], ["serve", "{ckpt}", "--max-k", "100"],
    ["bench", "{ckpt}", "--k", "2", "1000"],
    ["export", "{ckpt}", "--format", "hf", "--out", "{out}", "--num-speculative-tokens", "0"],
    ["demo", "--max-new-tokens", "0"], ["demo", "--max-new-tokens", "nan"],
]


@pytest.mark.parametrize("args", OTHER_NUMBERS, ids=[" ".join(a[:1] + a[2:]) for a in OTHER_NUMBERS])
def test_other_numbers(ckpt, tmp_path, capsys, args):
    subst = {"{ckpt}": str(ckpt), "{out}": str(tmp_path / "out")}
    args = [subst.get(a, a) for a in args]
    flag = next(a for a in reversed(args) if a.startswith("--"))
    assert flag in cli_error(capsys, args, ckpt)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value", [("--device", "meta"), ("--device", "foo"), ("--device", "cuda:99"),
                                         ("--device", "\udcff"), ("--dtype", "float8"), ("--dtype", "")])
def test_device_and_dtype(ckpt, capsys, flag, value):
    line = cli_error(capsys, ["generate", str(ckpt), "--prompt", "x", flag, value], ckpt)
    assert "device" in line or "dtype" in line


@pytest.mark.parametrize("file", ["model.safetensors", "module.safetensors"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(ckpt, tmp_path, capsys, file, bad):
    ck = copy_ckpt(ckpt, tmp_path / "ck")
    state = load_file(str(ck / file))
    name = sorted(state)[-1]
    state[name] = state[name].clone()
    state[name].view(-1)[0] = bad
    save_file(state, str(ck / file), metadata={"format": "pt"})
    with pytest.raises(RecycleError) as e:
        load_checkpoint(ck)
    msg = one_line(e)
    assert str(ck / file) in msg and "non-finite" in msg and name in msg
    assert "non-finite" in cli_error(capsys, ["generate", str(ck), "--prompt", "x"], ck)


def test_transformers_directory_with_non_finite_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    from recyclegpt.hf.load import load_hf_model_dir

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        hf.model.layers[0].mlp.down_proj.weight[3, 5] = float("nan")
    hf.save_pretrained(tmp_path)
    with pytest.raises(RecycleError, match="non-finite") as e:
        load_hf_model_dir(tmp_path)
    assert "down_proj" in one_line(e)


# ---- 8. silent surprises -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_tokenizer(root, ckpt) -> Path:
    """A tokenizer of 600 tokens: more than the tiny model's vocabulary of 512."""
    big = Tokenizer.load(ckpt / "tokenizer.json")
    big.tok.add_tokens([f"<extra{i}>" for i in range(300)])
    assert big.vocab_size == 600
    big.save(root / "big.json")
    return root / "big.json"


def test_checkpoint_with_a_tokenizer_larger_than_the_model(ckpt, big_tokenizer, tmp_path, capsys):
    ck = copy_ckpt(ckpt, tmp_path / "ck")
    shutil.copy(big_tokenizer, ck / "tokenizer.json")
    with pytest.raises(RecycleError, match="600 tokens") as e:
        load_checkpoint(ck)
    one_line(e)
    assert "600 tokens" in cli_error(capsys, ["generate", str(ck), "--prompt", "x"], ck)


@pytest.mark.parametrize("extra, needle", [
    (["--tokenizer", "{big}"], "--tokenizer"),
    (["--tokenizer", "{big}", "--vocab-size", "520"], "--vocab-size 600"),
    (["--vocab-size", "100"], "--vocab-size 100"),
])
def test_train_refuses_a_vocabulary_that_does_not_fit_before_any_work(data, big_tokenizer, tmp_path, capsys, extra,
                                                                      needle):
    out = tmp_path / "out"
    args = ["train", "--data", str(data), "--out", str(out), "--preset", "tiny",
            *[str(big_tokenizer) if a == "{big}" else a for a in extra]]
    assert needle in cli_error(capsys, args, data, big_tokenizer)
    assert not out.exists()


def long_prompt(m: RecycleGPT, tokens: int) -> str:
    """A prompt of at least `tokens` tokens (and a few more at most)."""
    words = tokens // 4
    while len(m.encode("fox " * words)[0]) < tokens:
        words += 1
    return "fox " * words


def test_max_new_tokens_beyond_the_context_warns(m):
    ctx = m.model.cfg.max_seq_len
    prompt = long_prompt(m, ctx - 4)
    n = len(m.encode(prompt)[0])
    with pytest.warns(RecycleWarning, match=f"caps the new tokens at {ctx - n} ") as rec:
        out = m.generate_with_stats(prompt, mode="ar", max_new_tokens=ctx)
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    assert len(out.tokens[0]) <= ctx - n
    with pytest.warns(RecycleWarning, match="caps"):
        list(m.stream(prompt, mode="ar", max_new_tokens=ctx))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecycleWarning)
        m.generate(prompt, mode="ar", max_new_tokens=ctx - n)  # exactly what fits: no warning


@pytest.mark.parametrize("stream", [False, True])
def test_cli_notes_the_context_cap_in_one_line(ckpt, m, capsys, stream):
    ctx = m.model.cfg.max_seq_len
    prompt = long_prompt(m, ctx - 4)
    n = len(m.encode(prompt)[0])
    rc, out, err = run_cli(capsys, ["generate", str(ckpt), "--prompt", prompt, "--mode", "ar", "--max-new-tokens",
                                    "50", "--dtype", "float32", *(["--stream"] if stream else [])])
    assert rc == 0 and out.startswith(prompt)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: ") and f"caps the new tokens at {ctx - n} " in lines[0]


@pytest.mark.parametrize("prompts", [["a", "b"], ("a", "b", "c"), []])
def test_stream_refuses_anything_but_one_prompt(m, prompts):
    with pytest.raises(RecycleError, match="one prompt") as e:
        m.stream(prompts, max_new_tokens=2)
    one_line(e)


API_NAME = re.compile(r"\b[a-z]+(_[a-z]+)+=|=True|=False")


@pytest.fixture(scope="module")
def variant_ckpt(root, tok) -> Path:
    cfg, model, _ = tiny_pair(5)
    cfg.module = ModuleConfig(input_norms=True)
    return save_checkpoint(root / "variant", cfg, model, RecyclableModule(cfg.model, cfg.module), tok)


@pytest.mark.parametrize("args, flag", [
    (["export", "{ckpt}", "--format", "hf", "--out", "{existing}"], "--overwrite"),
    (["export", "{ckpt}", "--format", "eagle", "--out", "{existing}"], "--overwrite"),
    (["export", "{ckpt}", "--format", "all", "--out", "{existing}"], "--overwrite"),
    (["export", "{variant}", "--format", "eagle", "--out", "{fresh}"], "--allow-approximate"),
    (["export", "{variant}", "--format", "all", "--out", "{fresh}"], "--allow-approximate"),
    (["eval", "{ckpt}", "--agreement-tokens", "256"], "--agreement-tokens"),
    (["generate", "{ckpt}", "--prompt", "x", "--top-p", "0"], "--top-p"),
    (["generate", "{ckpt}", "--prompt", "x", "--top-k", "-2"], "--top-k"),
    (["generate", "{ckpt}", "--prompt", "x", "--stop", ""], "--stop"),
    (["generate", "{ckpt}", "--prompt", "x", "--max-new-tokens", "-5"], "--max-new-tokens"),
])
def test_cli_messages_name_flags_not_api_arguments(ckpt, variant_ckpt, tmp_path, capsys, args, flag):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    subst = {"{ckpt}": str(ckpt), "{variant}": str(variant_ckpt), "{existing}": str(existing),
             "{fresh}": str(tmp_path / "fresh")}
    line = cli_error(capsys, [subst.get(a, a) for a in args], ckpt, variant_ckpt, existing)
    assert flag in line and not API_NAME.search(line), line
    assert not (tmp_path / "fresh").exists()


def test_float_weights_survive_validation(ckpt):
    """The finiteness check leaves good weights as they were (bit for bit)."""
    _, model, _, _ = load_checkpoint(ckpt)
    saved = load_file(str(ckpt / "model.safetensors"))
    for k, v in saved.items():
        assert torch.equal(model.state_dict()[k], v)
