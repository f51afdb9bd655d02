"""Object-store inputs and outputs through the S3 protocol: an in-process S3 server (moto) plays
the store; mosaicml-streaming's own S3 code lists, downloads and uploads. `data tokenizer` and
`data prepare` read `s3://` globs, `prepare --remote s3://` uploads, and the loader trains from
the bucket: each gives exactly what the same files give locally."""

import json
import os

import boto3
import pytest
import torch

from rnnscale.data.loader import PackedLoader
from rnnscale.data.prepare import MARKER, prepare
from rnnscale.data.readers import list_files
from rnnscale.data.tokenizer import train_tokenizer

BUCKET = "rnnscale-test"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(local corpus dir, boto3 client) with the corpus uploaded under s3://BUCKET/corpus/."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"S3_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    root = tmp_path_factory.mktemp("s3corpus")
    (root / "sub").mkdir()
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) for i in range(30)]
    lines.insert(4, '{"text": broken')  # line 5
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    (root / "sub" / "b.txt").write_text("class B:\n    pass\n")
    (root / "sub" / "c.md").write_text("not matched by the glob")
    client = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"])
    client.create_bucket(Bucket=BUCKET)
    for path in root.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"corpus/{path.relative_to(root)}")
    yield root, client
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def samples(loader_dir: str, n: int):
    it = PackedLoader([(loader_dir, None)], seq_len=16, micro_batch_size=2, seed=3,
                      docs_per_batch=4, shuffle=True)  # fmt: skip
    return [next(it)["input_ids"] for _ in range(n)]


def test_globs_over_a_bucket(store):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        list_files([f"s3://{BUCKET}/corpus/*.parquet"])


def test_remote_inputs_and_outputs_match_local(store, tmp_path):
    root, client = store
    assert list_files([f"s3://{BUCKET}/corpus/**/*.txt", f"s3://{BUCKET}/corpus/*.jsonl"]) == [
        f"s3://{BUCKET}/corpus/sub/b.txt", f"s3://{BUCKET}/corpus/a.jsonl"]  # fmt: skip
    remote_in = [f"s3://{BUCKET}/corpus/*.jsonl", f"s3://{BUCKET}/corpus/**/*.txt"]
    local_in = [str(root / "*.jsonl"), str(root / "sub" / "*.txt")]

    tok_remote = train_tokenizer(remote_in, 320, tmp_path / "tok-remote")
    tok_local = train_tokenizer(local_in, 320, tmp_path / "tok-local")
    assert tok_remote["fingerprint"] == tok_local["fingerprint"]
    tok = tmp_path / "tok-local" / "tokenizer.model"

    got = prepare(remote_in, tok, tmp_path / "out", workers=2, progress=False,
                  remote=f"s3://{BUCKET}/shards")  # fmt: skip
    want = prepare(local_in, tok, tmp_path / "local-out", progress=False)
    assert (
        (got["documents"], got["tokens"])
        == (want["documents"], want["tokens"])
        == (31, got["tokens"])
    )
    assert [(s["file"], s["line"]) for s in got["skipped"]] == [
        (f"s3://{BUCKET}/corpus/a.jsonl", 5)
    ]
    assert not (tmp_path / "out" / ".inputs").exists()  # the downloads are gone
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="shards/")["Contents"]]
    assert f"shards/{MARKER}" in keys and "shards/index.json" in keys

    again = prepare(remote_in, tok, tmp_path / "out", progress=False,
                    remote=f"s3://{BUCKET}/shards")  # fmt: skip
    assert again["tokens"] == got["tokens"]  # found done: a no-op

    from_bucket = samples(f"s3://{BUCKET}/shards", 6)
    from_disk = samples(str(tmp_path / "local-out"), 6)
    assert all(torch.equal(a, b) for a, b in zip(from_bucket, from_disk, strict=True))
