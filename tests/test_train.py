"""Pretraining the small byte-level Llama: passkey samples, batches, resume, saved output, CLI errors."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import assert_same_training_run
from longrope import models, passkey, train
from longrope.cli import main
from longrope.data import Document, load_documents
from longrope.errors import UsageError
from longrope.passkey import PASSKEY_INTRO
from longrope.tokenization import BOS_ID, BYTE_OFFSET, EOS_ID, VOCAB_SIZE, byte_tokenizer, encode

WORDS = ("the of and a to in is was he that it his her with as had for she not but be on at by which have "
         "letter garden morning evening sister house window river ship whale captain").split()


def corpus(n_docs: int = 3, words: int = 1500, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    return [Document(f"doc{i}", " ".join(rng.choice(WORDS) for _ in range(words)) + ".") for i in range(n_docs)]


def tiny(**overrides) -> train.PretrainConfig:
    kw = dict(context=64, d_model=32, layers=2, heads=2, kv_heads=1, head_dim=16, intermediate_size=64, steps=6,
              batch_size=4, lr=3e-3, passkey_share=0.0, checkpoint_every=3, log_every=2, device="cpu",
              dtype="float32")
    kw.update(overrides)
    return train.PretrainConfig(**kw)


def text_of(ids) -> str:
    assert ids[0] == BOS_ID
    return bytes(i - BYTE_OFFSET for i in ids[1:]).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------
# passkey samples


@pytest.mark.parametrize("context", [256, 300, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_passkey_sample_length_depth_and_wording(context, depth):
    s = passkey.sample(context, 48213, depth)
    assert len(s.ids) == context
    text = text_of(s.ids)
    assert text.startswith(PASSKEY_INTRO + " ")
    assert text.endswith("What is the pass key? The pass key is 48213")
    needle = "The pass key is 48213. Remember it. 48213 is the pass key."
    assert text.count(needle) == 1
    assert text_of(s.ids[:s.needle_start]) + needle == text[:text.index(needle) + len(needle)]
    assert text_of((1, *s.ids[s.answer_start:])) == "48213"
    # the needle sits at the requested share of the filler (to a byte)
    intro = len(PASSKEY_INTRO) + 2  # BOS + intro + space
    before = s.needle_start - intro
    assert abs(before - depth * s.filler_tokens) <= 0.5
    assert s.filler_tokens == context - passkey.fixed_tokens(intro=True)
    if depth == 0.5 and context == 1000:
        assert "The grass is green. The sky is blue." in text


def test_passkey_sample_real_filler_no_intro_and_purity():
    filler = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home. "
    a = passkey.sample(200, "10007", 0.3, filler=filler, intro=False)
    assert a == passkey.sample(200, "10007", 0.3, filler=filler, intro=False)
    text = text_of(a.ids)
    assert len(a.ids) == 200 and text.startswith("Emma Woodhouse") and "grass" not in text
    assert text.endswith("The pass key is 10007")
    assert abs((a.needle_start - 1) - 0.3 * a.filler_tokens) <= 0.5
    with pytest.raises(UsageError, match="too short"):
        passkey.sample(passkey.fixed_tokens(intro=True) - 1, 12345, 0.5)
    with pytest.raises(UsageError):
        passkey.sample(300, 12345, 1.5)


def test_training_passkey_matches_evaluation_prompt():
    """The standard prompt built by evaluate has the same bytes as ours, minus the answer."""
    from longrope import evaluate

    tok = byte_tokenizer()
    prompt = passkey.passkey_prompt(tok, 400, 0.0, "31415")
    ours = passkey.sample(len(prompt.input_ids) + 6, "31415", 0.0)
    assert text_of(ours.ids).startswith(prompt.text.split(" The grass")[0])
    assert list(tok(prompt.text)["input_ids"]) == [1, *encode(prompt.text)]


# --------------------------------------------------------------------------------------------
# data and batches


def test_load_documents_formats_and_ids(tmp_path):
    rows = [{"id": "a", "text": "alpha " * 50}, {"id": "b", "text": "beta " * 50}, {"id": "c", "text": "gamma"}]
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "one.txt").write_text("one " * 20)
    docs = load_documents([tmp_path / "d.jsonl.gz", tmp_path / "txt"])
    assert [d.id for d in docs][:3] == ["a", "b", "c"] and len(docs) == 4
    assert [d.id for d in load_documents(tmp_path / "d.jsonl.gz", ids=["b", "a"])] == ["b", "a"]
    assert [d.id for d in load_documents(tmp_path / "d.jsonl.gz", exclude_ids=["a", "c"])] == ["b"]
    with pytest.raises(UsageError, match="no document with id zz"):
        load_documents(tmp_path / "d.jsonl.gz", ids=["zz"])
    stream = train.token_stream([Document("x", "hé")])
    assert stream.tolist() == [ord("h") + 3, 0xC3 + 3, 0xA9 + 3, EOS_ID]


def test_batches_are_deterministic_with_bos_and_passkey_share():
    stream = train.token_stream(corpus(2, 400))
    cfg = tiny(context=256, batch_size=10, passkey_share=0.3)
    a, b = train.make_batch(stream, cfg, 5), train.make_batch(stream, cfg, 5)
    assert torch.equal(a, b) and a.shape == (10, 256) and a.dtype == torch.long
    assert not torch.equal(a, train.make_batch(stream, cfg, 6))
    assert (a[:, 0] == BOS_ID).all() and int(a.min()) >= 0 and int(a.max()) < VOCAB_SIZE
    n_passkey = sum("What is the pass key? The pass key is" in text_of(row.tolist()) for row in a)
    assert n_passkey == 3


def test_lr_schedule_and_model_size():
    cfg = tiny(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert train.lr_at(cfg, 5) == pytest.approx(5e-4)
    assert train.lr_at(cfg, 10) == pytest.approx(1e-3)
    assert train.lr_at(cfg, 100) == pytest.approx(1e-4)
    lin = tiny(steps=100, warmup=0, schedule="linear", lr=1e-3, min_lr_ratio=0.0)
    assert train.lr_at(lin, 50) == pytest.approx(5e-4)
    # the default model is the bundled one: it must stay well under 8 MB in 16-bit
    default = train.PretrainConfig()
    model = train.build_model(default)
    n = sum(p.numel() for p in model.parameters())
    assert n == train.parameter_count(default)
    assert n * 2 < 7.5e6
    assert model.config.head_dim == 64 and model.config.max_position_embeddings == 256
    assert model.config._attn_implementation == "sdpa"


# --------------------------------------------------------------------------------------------
# training


def fixed_loss(model, batch) -> float:
    with torch.no_grad():
        return float(train.lm_loss(model.eval(), batch))


def test_training_lowers_loss_and_saves_a_loadable_model(tmp_path):
    docs = corpus()
    cfg = tiny(steps=30, batch_size=8, lr=1e-2, passkey_share=0.0, checkpoint_every=100, log_every=10)
    batch = train.make_batch(train.token_stream(docs), cfg, 10_000)
    before = fixed_loss(train.build_model(cfg), batch)
    result = train.pretrain(cfg, docs, tmp_path / "out", command="test", validation=corpus(1, 300, seed=1))
    out = result.out
    model, tokenizer = models.load(str(out))
    after = fixed_loss(model, batch)
    assert after < before - 1.0, (before, after)
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.max_position_embeddings) == (VOCAB_SIZE, 32, 2, 2, 1, 16, 64)
    assert c.rope_parameters["rope_theta"] == 10000.0 and c.rope_parameters["rope_type"] == "default"
    assert models.rope_info(c) == models.RopeInfo(dim=16, base=10000.0, original_length=64)
    assert tokenizer("hi")["input_ids"] == [1, ord("h") + 3, ord("i") + 3]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert (out / "generation_config.json").is_file() and not (out / train.CHECKPOINT).exists()
    record = json.loads((out / "pretrain.json").read_text())
    assert record["tokens_seen"] == 30 * 8 * 64 and record["command"] == "test"
    assert record["config"]["context"] == 64 and record["final_loss"] > 0 and record["validation_loss"] > 0
    assert {"torch", "transformers", "longrope"} <= set(record["versions"]) and record["date"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [10, 20, 30] and log[-1]["loss"] < log[0]["loss"]


class Stop(Exception):
    pass


def test_resume_matches_an_uninterrupted_run(tmp_path):
    docs = corpus()
    cfg = tiny(passkey_share=0.25, context=128, steps=6, checkpoint_every=3, log_every=1)
    train.pretrain(cfg, docs, tmp_path / "a", keep_checkpoint=True)

    def stop_after_4(info):
        if info.step == 4:
            raise Stop  # step 4 is lost: the checkpoint is from step 3

    with pytest.raises(Stop):
        train.pretrain(cfg, docs, tmp_path / "b", keep_checkpoint=True, callback=stop_after_4)
    assert torch.load(tmp_path / "b" / train.CHECKPOINT, weights_only=True)["step"] == 3
    with pytest.raises(UsageError, match="--resume"):
        train.pretrain(cfg, docs, tmp_path / "b")
    with pytest.raises(UsageError, match="different settings.*lr"):
        train.pretrain(tiny(passkey_share=0.25, context=128, lr=1e-3), docs, tmp_path / "b", resume=True)
    train.pretrain(cfg, docs, tmp_path / "b", resume=True, keep_checkpoint=True)

    a, b = assert_same_training_run(tmp_path / "a", tmp_path / "b", train.CHECKPOINT, train.LOG)
    assert a["model"].keys() == b["model"].keys()
    # a finished folder is not overwritten by accident
    with pytest.raises(UsageError):
        train.pretrain(cfg, docs, tmp_path / "a")


# --------------------------------------------------------------------------------------------
# command line


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in docs))
    return path


def test_cli_pretrain_end_to_end(tmp_path, capsys):
    data = write_jsonl(tmp_path / "docs.jsonl", corpus(3, 400))
    out = tmp_path / "model"
    rc = main(["pretrain", "--data", str(data), "--exclude-ids", "doc2", "--val-ids", "doc1", "--out", str(out),
               "--context", "128", "--d-model", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
               "--head-dim", "16", "--steps", "4", "--batch-size", "4", "--log-every", "2", "--eval-every", "2",
               "--device", "cpu", "--no-progress"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    record = json.loads((out / "pretrain.json").read_text())
    assert record["data"]["documents_ids"] == ["doc0"] and record["data"]["validation_documents"] == ["doc1"]
    assert record["config"]["passkey_share"] == 0.1 and record["config"]["kv_heads"] == 1
    assert all("val_loss" in json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines())
    model, _ = models.load(str(out))
    assert model.config.max_position_embeddings == 128


@pytest.mark.parametrize("extra, message", [
    (["--data", "MISSING.txt"], "no such file"),
    (["--context", "16"], "--context must be at least 32"),
    (["--heads", "3", "--kv-heads", "2"], "multiple of --kv-heads"),
    (["--context", "64", "--passkey-share", "0.5"], "--passkey-share > 0 needs --context"),
    (["--head-dim", "15"], "even"),
    (["--data-ids", "nope"], "no document with id nope"),
    (["--lr", "0"], "--lr must be positive"),
    (["--resume", "--force"], "contradict"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, extra, message):
    data = write_jsonl(tmp_path / "docs.jsonl", corpus(1, 100))
    argv = ["pretrain", "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "1", "--device", "cpu",
            "--no-progress"]
    # later options win in argparse, so `extra` overrides the defaults above
    rc = main(argv + extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and message in err, err
    assert err.startswith("longrope: error:")


def test_too_little_data_and_nonempty_out(tmp_path):
    with pytest.raises(UsageError, match="less than one --context"):
        train.pretrain(tiny(context=512), [Document("x", "short")], tmp_path / "o")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        train.pretrain(tiny(), corpus(1, 200), tmp_path / "full")
    assert (tmp_path / "full" / "something").exists()
    assert not np.isnan(train.lm_loss(train.build_model(tiny()), torch.ones(1, 8, dtype=torch.long)).item())
