"""The Hugging Face format (`rnnscale export --format hf`): tiny models of every mixer, trained a
few steps, exported, and loaded by transformers in a fresh process that cannot import rnnscale,
give rnnscale's logits, greedy generations and token ids."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rnnscale.launch.cli import main as cli
from rnnscale.train.config import dump_yaml, from_dict
from rnnscale.train.export import export_model
from rnnscale.train.generate import generate
from rnnscale.train.model import build_model

CASES = {
    "gla": ["gla"],
    "mamba2": ["mamba2"],
    "gated_deltanet": ["gated_deltanet"],
    "hybrid": ["gla", "attn", "swa"],
    "zoo": ["retnet", "hgrn2", "mingru", "minlstm", "rglru", "gated_deltanet"],
}
TEXTS = ["def f(x):\n    return x + 12345", "naïve café, 東京  two  spaces\ttab", "x", "a</s>b<s>"]
PROMPT = [1, 7, 30, 12, 9]


def _config(pattern, run_dir):
    return from_dict({
        "run": {"dir": str(run_dir)},
        "model": {
            "vocab_size": 300, "d_model": 32, "num_layers": len(pattern), "num_heads": 2,
            "mixer_pattern": pattern, "swa": {"window": 6}, "hgrn2": {"expand_ratio": 8},
            "mamba2": {"head_dim": 8, "state_size": 8, "n_groups": 2},
            "gated_deltanet": {"num_householder": 2} if len(pattern) > 1 else {},
        },
        "kernels": {"chunk_size": {"gla": 16, "simple_gla": 16, "delta": 16, "scan": 16}},
    })  # fmt: skip


def _train(model, steps=4):
    """A few AdamW steps on random tokens: weights away from their init (biases, norms)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 300, (2, 40), generator=g)
        model.loss(ids, ids).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from rnnscale.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    lines = [f"def f{i}(x):\n    return x * {i * 37} + 'naïve café'" for i in range(300)]
    (root / "corpus.txt").write_text("\n".join(lines))
    train_tokenizer([str(root / "corpus.txt")], 300, root / "out")
    return root / "out" / "tokenizer.model"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """Every case trained, written as a finished run directory and exported with `rnnscale
    export RUN --format hf` (in this process); then one fresh process loads them all."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    expect = {}
    for name, pattern in CASES.items():
        run_dir = root / name / "run"
        run_dir.mkdir(parents=True)
        cfg = _config(pattern, run_dir)
        model = _train(build_model(cfg.model, cfg.kernels))
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        export_model(model, run_dir)
        (run_dir / "tokenizer.model").write_bytes(tokenizer.read_bytes())
        assert (
            cli(["export", str(run_dir), "--format", "hf", "--out", str(root / name / "hf")]) == 0
        )
        ids = torch.randint(3, 300, (2, 45))
        with torch.no_grad():
            logits, _ = model(ids)
            short, _ = model(ids[1:, 12:])
        expect[name] = {"ids": ids.tolist(), "logits": logits, "short": short[0],
                        "greedy": generate(model, PROMPT, 8, temperature=0)}  # fmt: skip
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        class NoRnnscale(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "rnnscale" or name.startswith("rnnscale."):
                    raise ImportError("rnnscale is not installed here")
        sys.meta_path.insert(0, NoRnnscale())
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        inputs, out = json.load(open({str(root / "inputs.json")!r})), {{}}
        for name, ids in inputs["ids"].items():
            d = {str(root)!r} + "/" + name + "/hf"
            model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
            tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
            ids = torch.tensor(ids)
            mask = torch.ones_like(ids)
            mask[1, :12] = 0  # row 1: its last 33 tokens, left-padded
            with torch.no_grad():
                logits = model(ids).logits
                padded = model(ids, attention_mask=mask).logits[1, 12:]
            prompt = torch.tensor([inputs["prompt"]])
            greedy = model.generate(prompt, max_new_tokens=8, do_sample=False,
                                    attention_mask=torch.ones_like(prompt))
            # beam search reorders the cache: each beam's score is its tokens' log-probability
            beams = model.generate(prompt, max_new_tokens=5, num_beams=3, num_return_sequences=3,
                                   do_sample=False, length_penalty=0.0, output_scores=True,
                                   return_dict_in_generate=True,
                                   attention_mask=torch.ones_like(prompt))
            beam = []
            for seq, score in zip(beams.sequences, beams.sequences_scores):
                with torch.no_grad():
                    lp = torch.log_softmax(model(seq[None]).logits[0, 4:-1], -1)
                beam.append([float(score), float(lp.gather(1, seq[5:, None]).sum())])
            out[name] = {{"logits": logits.tolist(), "padded": padded.tolist(),
                         "greedy": greedy[0, 5:].tolist(), "beam": beam,
                         "tokens": [tok(t)["input_ids"] for t in inputs["texts"]],
                         "decoded": [tok.decode(tok(t)["input_ids"], skip_special_tokens=True)
                                     for t in inputs["texts"]],
                         "specials": [tok.decode([tok.bos_token_id]),
                                      tok.decode(tok(inputs["texts"][2])["input_ids"])],
                         "modules": sorted(m for m in sys.modules if m.startswith("rnnscale"))}}
        json.dump(out, open({str(root / "outputs.json")!r}, "w"))
    """)  # fmt: skip
    inputs = {"ids": {n: e["ids"] for n, e in expect.items()}, "prompt": PROMPT, "texts": TEXTS}
    (root / "inputs.json").write_text(json.dumps(inputs))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                         "HF_MODULES_CACHE": str(root / "modules")})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return root, expect, json.loads((root / "outputs.json").read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_gives_rnnscales_logits_and_generations(exported, name):
    root, expect, got = exported
    assert got[name]["modules"] == []  # the fresh process never imported rnnscale
    want = expect[name]
    torch.testing.assert_close(torch.tensor(got[name]["logits"]), want["logits"],
                               atol=2e-5, rtol=1e-5)  # fmt: skip
    # left padding is invisible: the padded row's logits are those of its tokens alone
    torch.testing.assert_close(torch.tensor(got[name]["padded"]), want["short"],
                               atol=2e-5, rtol=1e-5)  # fmt: skip
    assert got[name]["greedy"] == want["greedy"]  # generate() with the recurrent cache
    scores, log_probs = zip(*got[name]["beam"])
    assert scores == pytest.approx(log_probs, abs=1e-4)


def test_transformers_tokenizer_gives_the_runs_ids(exported, tokenizer):
    import sentencepiece

    _, _, got = exported
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    assert got["gla"]["tokens"] == [[1, *sp.encode(t)] for t in TEXTS]
    assert got["gla"]["decoded"] == TEXTS
    # special tokens decode to their text (lm-eval's hf model looks for "<s>" to add BOS)
    assert got["gla"]["specials"] == ["<s>", "<s>x"]


def test_export_writes_a_complete_directory(exported):
    root, _, _ = exported
    d = root / "hybrid" / "hf"
    names = {p.name for p in d.iterdir()}
    files = {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
             "generation_config.json", "modeling_rnnscale.py", "layers_rnnscale.py"}  # fmt: skip
    assert files <= names
    assert not [n for n in names if n.endswith(".tmp")]
    config = json.loads((d / "config.json").read_text())
    assert config["layer_types"] == ["gla", "attn", "swa"]
    assert config["rnnscale_model"]["mixer_pattern"] == ["gla", "attn", "swa"]
    from safetensors.torch import load_file

    weights = load_file(d / "model.safetensors")
    assert "embed.weight" in weights and "head.weight" not in weights  # tied: stored once


def test_export_hf_names_a_missing_source(tmp_path, capsys):
    assert cli(["export", str(tmp_path / "nope"), "--format", "hf", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.parametrize("name", ["zoo", "hybrid"])
def test_export_import_export_is_identical(exported, tmp_path, name):
    """`rnnscale import-hf` gives the model section (with model.init_from) and chunk sizes; a
    model built from it with those weights exports to the same bytes, file by file."""
    from rnnscale.train.config import load_config
    from rnnscale.train.hf import export_hf
    from rnnscale.train.hf.load import load_initial_weights

    root, _, _ = exported
    source = root / name / "hf"
    assert cli(["import-hf", str(source), "--out", str(tmp_path / "model.yaml")]) == 0
    cfg = load_config(tmp_path / "model.yaml")
    assert cfg.model.init_from == str(source.resolve())
    model = build_model(cfg.model, cfg.kernels)
    load_initial_weights(model, cfg)
    export_hf(model, cfg, source / "tokenizer.model", tmp_path / "again")
    assert _files(tmp_path / "again") == _files(source)


def test_init_from_refuses_another_architecture(exported, tmp_path):
    from rnnscale.train.config import ConfigError, load_config
    from rnnscale.train.hf.load import check_source

    root, _, _ = exported
    assert cli(["import-hf", str(root / "gla" / "hf"), "--out", str(tmp_path / "m.yaml")]) == 0
    cfg = load_config(tmp_path / "m.yaml", ["model.d_model=64", "model.gla.expand_k=1.0"])
    with pytest.raises(ConfigError, match=r"is another architecture \(d_model: 32 there, 64 "
                       r"here; mixers: .*\): set the model section to its own"):  # fmt: skip
        check_source(cfg)


def test_a_run_goes_on_from_an_exported_model(exported, repo_root, tmp_path):
    """Run A trains and evaluates; its export, imported (`import-hf`, `model.init_from`), scores
    A's validation batches exactly as A's last evaluation did, and run B's first training loss
    is that model's loss on B's first batch: B starts where A ended."""
    from rnnscale.train import trainer
    from rnnscale.train.batches import RowShape, make_batches, make_val_batches
    from rnnscale.train.config import load_config
    from rnnscale.train.hf.load import load_initial_weights

    common = ["train.seq_len=64", "train.micro_batch_size=4", "train.global_batch_size=4",
              "train.eval_batches=2", "log.progress_bar=false"]  # fmt: skip
    a = load_config(repo_root / "configs" / "debug_cpu.yaml",
                    [*common, f"run.dir={tmp_path / 'a'}", "train.max_steps=3",
                     "train.eval_interval=3"])  # fmt: skip
    trainer.run(a)
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    last_eval = [x["eval_loss"] for x in lines if "eval_loss" in x][-1]
    assert (
        cli(["export", str(tmp_path / "a"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    )
    assert cli(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "b.yaml")]) == 0
    b = load_config(tmp_path / "b.yaml", [*common, f"run.dir={tmp_path / 'b'}",
                                          "train.max_steps=1"])  # fmt: skip
    trainer.run(b)
    first = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    model = build_model(b.model, b.kernels)
    load_initial_weights(model, b)
    val = make_val_batches(a.data, RowShape.of(a), a.run.seed, 2)
    assert trainer.evaluate(model, val, "cpu")["eval_loss"] == last_eval
    batch = next(make_batches(b.data, RowShape.of(b), b.run.seed, tmp_path / "b"))
    assert first["step"] == 1
    assert first["loss"] == trainer.evaluate(model, [batch], "cpu")["eval_loss"]


def test_exported_model_refuses_right_padding(exported):
    from transformers import AutoModelForCausalLM

    root, _, _ = exported
    model = AutoModelForCausalLM.from_pretrained(root / "gla" / "hf", trust_remote_code=True)
    ids = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 2]])
    with pytest.raises(ValueError, match="rnnscale models take left padding only"):
        model(ids, attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))


@pytest.mark.gpu
def test_exported_model_runs_on_the_gpu(tmp_path):
    """The exported hybrid on CUDA (fp32): rnnscale's CPU logits and greedy tokens; bf16 runs."""
    from transformers import AutoModelForCausalLM

    from rnnscale.train.hf import export_hf

    cfg = _config(CASES["hybrid"] + ["gated_deltanet", "mamba2"], tmp_path / "run")
    model = _train(build_model(cfg.model, cfg.kernels))
    export_hf(model, cfg, None, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    hf = hf.cuda().eval()
    ids = torch.randint(3, 300, (2, 45))
    with torch.no_grad():
        want, _ = model(ids)
        got = hf(ids.cuda()).logits.cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    prompt = torch.tensor([PROMPT])
    greedy = hf.generate(prompt.cuda(), max_new_tokens=8, do_sample=False,
                         attention_mask=torch.ones_like(prompt).cuda())  # fmt: skip
    assert greedy[0, len(PROMPT) :].tolist() == generate(model, PROMPT, 8, temperature=0)
    with torch.no_grad():
        assert torch.isfinite(hf.bfloat16()(ids.cuda()).logits).all()


def test_init_from_under_zero3_on_two_ranks_starts_where_one_rank_does(exported, tmp_path):
    """model.init_from into a model ZeRO-3 built partitioned (2 gloo ranks, torchrun): the
    first step's loss is that of the same weights on one rank, whole."""
    from launcher import losses, run_ranks

    root, _, _ = exported
    assert cli(["import-hf", str(root / "hybrid" / "hf"), "--out", str(tmp_path / "m.yaml")]) == 0
    common = [str(tmp_path / "m.yaml"), "train.max_steps=1", "train.seq_len=32",
              "train.global_batch_size=4", "log.progress_bar=false", "log.tensorboard=false",
              "log.wandb.mode=disabled"]  # fmt: skip
    bin_dir = Path(sys.executable).parent
    one = [sys.executable, "-m", "rnnscale.train", *common, f"run.dir={tmp_path / 'one'}",
           "train.micro_batch_size=4", "parallel.zero_stage=0"]  # fmt: skip
    two = [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m",
           "rnnscale.train", *common, f"run.dir={tmp_path / 'two'}", "train.micro_batch_size=2",
           "parallel.zero_stage=3", "parallel.stage3_param_persistence_threshold=0"]  # fmt: skip
    for cmd in (one, two):
        r = run_ranks(cmd, cwd=Path(__file__).resolve().parents[1], timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "weights from model.init_from" in r.stdout + r.stderr
    assert losses(tmp_path / "two")[1] == pytest.approx(losses(tmp_path / "one")[1], abs=1e-5)
    # and that is the exported model's loss on the first rows, not a random init's
    from rnnscale.train.batches import RowShape, make_batches
    from rnnscale.train.config import load_config
    from rnnscale.train.hf.load import load_initial_weights
    from rnnscale.train.trainer import evaluate

    cfg = load_config(tmp_path / "m.yaml", common[1:] + ["train.micro_batch_size=4"])
    model = build_model(cfg.model, cfg.kernels)
    load_initial_weights(model, cfg)
    batch = next(make_batches(cfg.data, RowShape.of(cfg), cfg.run.seed, tmp_path / "x"))
    want = evaluate(model, [batch], "cpu")["eval_loss"]
    assert losses(tmp_path / "one")[1] == pytest.approx(want, abs=1e-6)
