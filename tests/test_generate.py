"""Generation: the recurrent decoding loop picks what the parallel forward would, sampling
respects temperature and top-p, and `rnnscale generate` works on a finished run with or without
a sentencepiece tokenizer."""

import subprocess
import sys

import pytest
import sentencepiece
import torch
from test_cli import rnnscale

from rnnscale.train.config import from_dict
from rnnscale.train.export import export_model, load_exported
from rnnscale.train.generate import generate, sample
from rnnscale.train.model import build_model


def test_greedy_decoding_follows_the_parallel_forward():
    cfg = {"vocab_size": 61, "d_model": 32, "num_layers": 3, "num_heads": 2}
    cfg.update(mixer_pattern=["gla", "attn", "swa"], swa={"window": 4})
    run = from_dict({"model": cfg, "kernels": {"backend": "torch", "chunk_size": {"gla": 8}}})
    torch.manual_seed(0)
    model = build_model(run.model, run.kernels).double().eval()
    prompt = [1, 5, 9, 2, 33]
    new = generate(model, prompt, 20, temperature=0)
    assert len(new) == 20
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt + new]))
    assert new == logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()


def test_sampling_stays_in_the_nucleus():
    logits = torch.tensor([4.0, 3.9, 0.0, -1.0, -2.0])  # the first two hold ~96% of the mass
    gen = torch.Generator().manual_seed(0)
    picks = {sample(logits, 1.0, 0.9, gen) for _ in range(300)}
    assert picks == {0, 1}
    assert sample(logits, 0, 1.0) == 0
    hot = {sample(logits, 5.0, 1.0, gen) for _ in range(300)}
    assert hot == {0, 1, 2, 3, 4}


def test_generate_stops_at_the_stop_id():
    cfg = from_dict({"model": {"vocab_size": 11, "d_model": 16, "num_heads": 2}}).model
    model = build_model(cfg).eval()
    first = generate(model, [1], 1, temperature=0)[0]
    assert generate(model, [1], 50, temperature=0, stop_id=first) == [first]


def test_export_round_trip_keeps_tied_weights(tmp_path):
    (tmp_path / "config.yaml").write_text("model:\n  vocab_size: 50\n  d_model: 16\n")
    from rnnscale.train.config import load_config

    model = build_model(load_config(tmp_path / "config.yaml").model)
    export_model(model, tmp_path)
    loaded, _ = load_exported(tmp_path)
    assert loaded.head.weight is loaded.embed.weight
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, repo_root=None):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path_factory.mktemp("gen") / "run"
    r = rnnscale("train", "configs/debug_cpu.yaml", "train.max_steps=3", f"run.dir={run_dir}",
                 "log.progress_bar=false", cwd=root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "rnnscale generate" in r.stdout
    return run_dir


def test_cli_generates_from_token_ids(trained_run, repo_root):
    r = rnnscale("generate", str(trained_run), "--prompt-ids", "1 17", "--max-new-tokens", "6",
                 "--temperature", "0", cwd=repo_root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    ids = [int(t) for t in r.stdout.split()]
    assert ids[:2] == [1, 17] and len(ids) == 8
    model, _ = load_exported(trained_run)
    assert ids[2:] == generate(model, [1, 17], 6, temperature=0)


def test_cli_generates_text_with_the_run_tokenizer(trained_run, repo_root, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"the cat {i} sat on the mat number {i * 7}" for i in range(200)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=120, model_type="bpe",
        byte_fallback=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
    )  # fmt: skip
    no_tok = rnnscale("generate", str(trained_run), "--prompt", "the cat", cwd=repo_root)
    assert no_tok.returncode == 2 and "pass --prompt-ids" in no_tok.stderr
    (trained_run / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    try:
        r = rnnscale("generate", str(trained_run), "--prompt", "the cat", "--max-new-tokens", "5",
                     cwd=repo_root)  # fmt: skip
    finally:
        (trained_run / "tokenizer.model").unlink()
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the cat")


def test_cli_generate_errors(tmp_path, repo_root):
    r = rnnscale("generate", str(tmp_path), "--prompt-ids", "1", cwd=repo_root)
    assert r.returncode == 2 and "config.yaml not found" in r.stderr
    (tmp_path / "config.yaml").write_text("model:\n  vocab_size: 50\n")
    r = rnnscale("generate", str(tmp_path), "--prompt-ids", "1", cwd=repo_root)
    assert r.returncode == 2 and "run has not finished" in r.stderr
    r = subprocess.run([sys.executable, "-m", "rnnscale.launch.cli", "generate", str(tmp_path)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "--prompt" in r.stderr
    r = rnnscale("generate", str(tmp_path / "nothing"), "--prompt-ids", "1", cwd=repo_root)
    assert r.returncode == 2 and f"{tmp_path / 'nothing'} does not exist: pass a run" in r.stderr


def test_cli_generate_refuses_bad_ids_and_a_damaged_model(trained_run, repo_root, tmp_path):
    import shutil

    r = rnnscale("generate", str(trained_run), "--prompt-ids", "1 abc", cwd=repo_root)
    assert r.returncode == 2 and "--prompt-ids must be ids in [0, 256), got '1 abc'" in r.stderr
    damaged = tmp_path / "run"
    shutil.copytree(trained_run, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    r = rnnscale("generate", str(damaged), "--prompt-ids", "1", cwd=repo_root)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{weights} cannot be loaded (" in r.stderr and "rnnscale export CHECKPOINT" in r.stderr
