"""Long-context fine-tuning: packing, the chunked loss, lower loss, exact resume, the CLI."""

from __future__ import annotations

import json
import random
import sys

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from conftest import ORIGINAL, assert_same_training_run, tiny_model
from longrope import models, train
from longrope import scaling as sc
from longrope.cli import main
from longrope.errors import UsageError
from longrope.tokenization import byte_tokenizer

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards hex jolly zebras".split()
SEQ = 128  # 2× the tiny model's context of 64


def text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def packed_data(seq_len: int = SEQ, n_docs: int = 4, n_words: int = 60) -> np.ndarray:
    tok = byte_tokenizer()
    docs = [tok(text(n_words, i))["input_ids"] for i in range(n_docs)]
    return train.pack_documents(docs, seq_len, tok.bos_token_id, tok.eos_token_id)


def scaling_for(length: int = SEQ):
    return sc.make("longrope", ORIGINAL, length, dim=16, base=10000.0)


def config(**kw) -> train.FinetuneConfig:
    base = dict(seq_len=SEQ, steps=6, lr=1e-3, warmup=1, batch_size=2, grad_accum=1, checkpoint_every=2,
                log_every=1, loss_chunk=48, device="cpu", dtype="float32")
    base.update(kw)
    return train.FinetuneConfig(**base)


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_pack_documents_adds_bos_eos_once_and_drops_the_tail():
    packed = train.pack_documents([[1, 5, 6], [7, 8, 2], [9]], 4, bos_id=1, eos_id=2)
    # stream: 1 5 6 2 | 1 7 8 2 | 1 9 2  -> two full sequences, the 3-token tail dropped
    assert packed.tolist() == [[1, 5, 6, 2], [1, 7, 8, 2]]
    with pytest.raises(UsageError, match="--seq-len 100: the documents hold 11 tokens"):
        train.pack_documents([[1, 5, 6], [7, 8, 2], [9]], 100, bos_id=1, eos_id=2)


def test_batches_are_a_pure_function_of_seed_and_step():
    packed = np.arange(5 * 4).reshape(5, 4)
    cfg = config(seq_len=4, batch_size=2, grad_accum=2)
    seen = [finetune_rows(packed, cfg, step) for step in (1, 2, 3)]
    assert seen == [finetune_rows(packed, cfg, step) for step in (1, 2, 3)]
    first_epoch = [r for step in seen for r in step][:5]
    assert sorted(first_epoch) == [0, 1, 2, 3, 4]  # every sequence once per epoch


def finetune_rows(packed, cfg, step):
    return [int(row[0]) // 4 for micro in range(cfg.grad_accum)
            for row in train.finetune_batch(packed, cfg, step, micro)]


def test_chunked_loss_equals_the_full_logits_loss_and_gradients():
    model = tiny_model()
    models.attach(model, scaling_for())
    ids = torch.as_tensor(packed_data()[:2])
    nll, n = train.chunked_lm_loss(model, ids, chunk=37)
    (nll / n).backward()
    chunked = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=ids, use_cache=False).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    ref.backward()
    assert n == 2 * (SEQ - 1)
    assert torch.allclose(nll / n, ref, rtol=1e-5)
    for k, p in model.named_parameters():
        assert torch.allclose(chunked[k], p.grad, atol=1e-6), k


def batch_loss(model, batch) -> float:
    with torch.no_grad():
        nll, n = train.chunked_lm_loss(model.eval(), batch)
    return float(nll / n)


def test_finetuning_lowers_the_loss_and_exports_the_scaling(tmp_path):
    packed = packed_data()
    cfg = config(steps=8, checkpoint_every=100)
    model, tok = tiny_model(), byte_tokenizer()
    batch = train.finetune_batch(packed, cfg, 1)
    models.attach(model, scaling_for())
    before = batch_loss(model, batch)
    result = train.finetune(model, tok, scaling_for(), packed, cfg, tmp_path / "ft", identity={"data": "test"},
                            command="test")
    after = batch_loss(result.model, batch)
    assert after < before - 0.5, (before, after)
    out = tmp_path / "ft"
    config_json = AutoConfig.from_pretrained(out)
    assert config_json.rope_parameters["rope_type"] == "longrope" and config_json.max_position_embeddings == SEQ
    loaded, _ = models.load(str(out))
    assert abs(batch_loss(loaded, batch) - after) < 1e-4  # the export is the trained model
    record = json.loads((out / train.FT_RECORD).read_text())
    assert record["tokens_seen"] == 8 * 2 * SEQ and record["final_loss"] < record["first_loss"]
    assert record["scaling"]["rope_type"] == "longrope" and record["config"]["lr"] == 1e-3
    log = [json.loads(line) for line in (out / train.LOG).read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 9)) and log[0]["lr"] == 1e-3  # warm-up of 1 step
    assert log[-1]["lr"] == pytest.approx(1e-4)  # cosine decay (the default) to a tenth at the last step
    assert not (out / train.CHECKPOINT).exists()


def test_the_learning_rate_follows_the_model_size_unless_given(tmp_path):
    model = tiny_model()
    n_parameters = sum(p.numel() for p in model.parameters())
    cfg = config(steps=1, checkpoint_every=100, lr=None)
    result = train.finetune(model, byte_tokenizer(), scaling_for(), packed_data(), cfg, tmp_path / "ft",
                            identity={"data": "test"})
    assert result.record["config"]["lr"] == train.default_lr(n_parameters) == 5e-5  # the help's figures
    assert cfg.for_model(7 * 10 ** 9).lr == train.default_lr(7 * 10 ** 9) == 2e-5  # LongRoPE's, for LLaMA-2-7B
    assert config(lr=3e-4).for_model(10 ** 10).lr == 3e-4  # a given lr is kept


class Stop(Exception):
    pass


def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path):
    packed, tok = packed_data(), byte_tokenizer()
    cfg = config(steps=6, checkpoint_every=2, grad_accum=2, batch_size=1)
    train.finetune(tiny_model(), tok, scaling_for(), packed, cfg, tmp_path / "a", keep_checkpoint=True)

    def stop_at_5(info):
        if info.step == 5:
            raise Stop  # step 5 is lost: the last checkpoint is step 4's

    with pytest.raises(Stop):
        train.finetune(tiny_model(), tok, scaling_for(), packed, cfg, tmp_path / "b", keep_checkpoint=True,
                       callback=stop_at_5)
    assert torch.load(tmp_path / "b" / train.CHECKPOINT, weights_only=True)["step"] == 4
    with pytest.raises(UsageError, match="--resume"):
        train.finetune(tiny_model(), tok, scaling_for(), packed, cfg, tmp_path / "b")
    with pytest.raises(UsageError, match="different settings.*lr"):
        train.finetune(tiny_model(), tok, scaling_for(), packed, config(steps=6, checkpoint_every=2, grad_accum=2,
                                                                        batch_size=1, lr=5e-4),
                       tmp_path / "b", resume=True)
    with pytest.raises(UsageError, match="different settings.*scaling"):
        train.finetune(tiny_model(), tok, scaling_for(256), packed, cfg, tmp_path / "b", resume=True)
    # the optimizer state after resuming equals the one the checkpoint holds
    seen = {}

    def capture(info):
        seen.setdefault("step", info.step)

    train.finetune(tiny_model(), tok, scaling_for(), packed, cfg, tmp_path / "b", resume=True,
                   keep_checkpoint=True, callback=capture)
    assert seen["step"] == 5

    a, b = assert_same_training_run(tmp_path / "a", tmp_path / "b", train.CHECKPOINT, train.LOG)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


def test_resume_loads_the_optimizer_state_exactly(tmp_path):
    """The optimizer a resumed run continues with is the checkpoint's, tensor for tensor."""
    packed, tok = packed_data(), byte_tokenizer()
    cfg = config(steps=4, checkpoint_every=2)

    def stop_at_3(info):
        if info.step == 3:
            raise Stop

    with pytest.raises(Stop):
        train.finetune(tiny_model(), tok, scaling_for(), packed, cfg, tmp_path / "c", callback=stop_at_3)
    saved = torch.load(tmp_path / "c" / train.CHECKPOINT, weights_only=True)
    original_step = torch.optim.AdamW.step
    states = []

    def spy(self, *args, **kwargs):  # the state just before the first step after resuming
        if not states:
            states.append({i: {k: torch.as_tensor(v).clone() for k, v in s.items()}
                           for i, s in enumerate(self.state[p] for g in self.param_groups for p in g["params"])})
        return original_step(self, *args, **kwargs)

    torch.optim.AdamW.step = spy
    try:
        train.finetune(tiny_model(), tok, scaling_for(), packed, cfg, tmp_path / "c", resume=True)
    finally:
        torch.optim.AdamW.step = original_step
    for i, s in saved["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), states[0][i][k]), (i, k)


# --------------------------------------------------------------------------------------------
# command line


def write_data(path, n_docs=3, n_words=80):
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": text(n_words, i)}) + "\n" for i in range(n_docs)))
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_finetune_end_to_end(tiny_model_dir, tmp_path, capsys):
    data = write_data(tmp_path / "docs.jsonl")
    out = tmp_path / "ft"
    code, stdout, _ = run(capsys, "finetune", "--model", tiny_model_dir, "--method", "longrope", "--target-length",
                          128, "--data", data, "--steps", 3, "--lr", "1e-3", "--out", out, "--device", "cpu",
                          "--checkpoint-every", 2, "--no-progress")
    assert code == 0 and "wrote" in stdout
    assert json.loads((out / "config.json").read_text())["rope_scaling"]["type"] == "longrope"
    assert len((out / train.LOG).read_text().splitlines()) == 3
    code, _, err = run(capsys, "finetune", "--model", tiny_model_dir, "--method", "longrope", "--target-length",
                       128, "--data", data, "--steps", 3, "--out", out, "--no-progress")
    assert code == 2 and "already holds a finished model" in err


def test_cli_notes_unseen_angles_and_keep_angles_seen_trains_without_them(tiny_model_dir, tmp_path, capsys):
    """A LongRoPE scaling whose unturned pairs (3-7 of the tiny model's 8) are stretched less than s = 2
    gets the note; --keep-angles-seen trains and exports the factors raised to s, and no note."""
    data, file = write_data(tmp_path / "docs.jsonl"), tmp_path / "scaling.json"
    factors = [1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0, 2.2]
    file.write_text(sc.LongRoPEScaling(long_factor=factors, factor=2.0, original_max_position_embeddings=ORIGINAL)
                    .to_json())
    argv = ["finetune", "--model", tiny_model_dir, "--scaling", file, "--data", data, "--steps", 1, "--device", "cpu",
            "--no-progress"]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "plain")
    assert code == 0 and "beyond a distance of 82 tokens" in err  # 63 · 1.3, pair 3's
    exported = json.loads((tmp_path / "plain" / "config.json").read_text())["rope_scaling"]["long_factor"]
    assert exported == factors
    code, _, err = run(capsys, *argv, "--out", tmp_path / "kept", "--keep-angles-seen")
    assert code == 0 and "beyond a distance" not in err
    exported = json.loads((tmp_path / "kept" / "config.json").read_text())["rope_scaling"]["long_factor"]
    assert exported == [1.0, 1.1, 1.2, 2.0, 2.0, 2.0, 2.0, 2.2]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "margin", "--keep-angles-seen", "--seen-margin", "1.5")
    assert code == 0 and "beyond a distance" not in err
    exported = json.loads((tmp_path / "margin" / "config.json").read_text())["rope_scaling"]["long_factor"]
    assert exported == [1.0, 1.1, 1.2, 3.0, 3.0, 3.0, 3.0, 3.0]  # 1.5 · s
    code, _, err = run(capsys, "finetune", "--model", tiny_model_dir, "--method", "yarn", "--target-length", 128,
                       "--data", data, "--steps", 1, "--out", tmp_path / "yarn", "--keep-angles-seen", "--no-progress")
    assert code == 2 and "--keep-angles-seen: needs a LongRoPE scaling" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "yarn").exists()


@pytest.mark.parametrize("extra, message", [
    (["--seq-len", "64k"], "--seq-len 65536: the documents hold"),
    (["--steps", "0"], "--steps must be positive"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--target-length", "32"], "target_length: must be greater than the model's context 64"),
    # here: liger-kernel is not installed; where it is, --device cpu is what is refused
    (["--fused-loss", "--device", "cpu"], "--fused-loss: needs "),
])
def test_cli_finetune_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys, extra, message):
    data = write_data(tmp_path / "docs.jsonl")
    argv = ["finetune", "--model", tiny_model_dir, "--method", "longrope", "--target-length", 128, "--data", data,
            "--steps", 2, "--out", tmp_path / "o", "--no-progress"]
    for i in range(0, len(extra), 2):  # later options win in argparse
        argv += extra[i:i + 2]
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("keep_from, kept", [(SEQ, True), (SEQ + 1, False)])
def test_checkpointing_keeps_attention_from_its_length_on(tmp_path, monkeypatch, keep_from, kept):
    """Selective checkpointing only where attention dominates a step (`KEEP_ATTENTION_FROM`)."""
    asked = []
    real = models.enable_checkpointing

    def spy(model, keep_attention=False):
        asked.append(keep_attention)
        return real(model, keep_attention=keep_attention)

    monkeypatch.setattr(models, "enable_checkpointing", spy)
    monkeypatch.setattr(sys.modules["longrope.train.finetune"], "KEEP_ATTENTION_FROM", keep_from)
    train.finetune(tiny_model(), byte_tokenizer(), scaling_for(), packed_data(), config(steps=1), tmp_path / "ft")
    assert asked == [kept]


@pytest.mark.parametrize("keep_from", [SEQ, SEQ + 1])  # selective checkpointing (a long run's), whole layers
def test_compiled_layers_train_as_the_eager_ones(tmp_path, monkeypatch, keep_from):
    """--compile-layers: the same run as without it, to float32 rounding (inductor fuses and
    reorders), needle checks included (they run eager); the model handed back runs its class's
    own forward and saves the same keys."""
    from torch._dynamo.utils import counters

    from test_finetune_retrieval import needles

    monkeypatch.setattr(sys.modules["longrope.train.finetune"], "KEEP_ATTENTION_FROM", keep_from)
    results, graphs = {}, {}
    for compiled in (False, True):
        torch._dynamo.reset()  # compile afresh: another test's cached graphs would leave the counter at 0
        counters.clear()
        cfg = config(steps=2, doc_mask=True, needle_every=1, checkpoint_every=100, compile_layers=compiled)
        results[compiled] = train.finetune(tiny_model(), byte_tokenizer(), scaling_for(), packed_data(), cfg,
                                           tmp_path / f"ft-{compiled}", needles=needles())
        graphs[compiled] = counters["stats"]["unique_graphs"]
    assert graphs[False] == 0 and graphs[True] >= 1  # the compiled run did compile
    eager, compiled = results[False].model.state_dict(), results[True].model.state_dict()
    assert list(eager) == list(compiled)
    start = tiny_model().state_dict()
    assert not torch.allclose(eager["model.layers.0.mlp.down_proj.weight"], start["model.layers.0.mlp.down_proj.weight"])
    for name in eager:
        assert torch.allclose(eager[name], compiled[name], rtol=1e-4, atol=1e-6), name
    assert all("forward" not in layer.__dict__ for layer in results[True].model.model.layers)

    def needle_losses(run):
        log = (run.out / train.LOG).read_text().splitlines()
        return [json.loads(line)["needle_loss"] for line in log if "needle_loss" in line]

    assert needle_losses(results[True]) == pytest.approx(needle_losses(results[False]), rel=1e-4)
    assert len(needle_losses(results[True])) == 2


def test_the_fused_loss_scores_the_sequence_and_leaves_the_answers_and_the_kl_chunked(monkeypatch):
    """chunked_lm_loss(fused=True) hands the whole sequence's hidden states to
    `nll.summed_nll_fused` once (Liger's kernel needs CUDA: a stand-in here computes the chunked sum),
    and the total equals the unfused one; the answers' extra term stays chunked."""
    from longrope import nll
    from longrope.train.parallel import chunked_lm_loss

    calls = []

    def stand_in(model, hidden, targets):
        calls.append(tuple(hidden.shape))
        return nll.summed_nll(model, hidden, targets, 7, torch.float32)

    monkeypatch.setattr(nll, "summed_nll_fused", stand_in)
    model, ids = tiny_model(), torch.tensor(packed_data()[:1])
    answers = torch.zeros_like(ids, dtype=torch.bool)
    answers[0, -3:] = True
    objective = dict(answers=answers, answer_weight=2.0)
    plain, n = chunked_lm_loss(model, ids, 16, **objective)
    fused, m = chunked_lm_loss(model, ids, 16, fused=True, **objective)
    assert calls == [(1, ids.shape[1] - 1, model.config.hidden_size)] and n == m
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)


def test_compile_layers_and_the_fused_loss_are_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="--compile-layers: one process only"):
        config(compile_layers=True).validate()
    with pytest.raises(UsageError, match="--fused-loss: one process only"):
        config(fused_loss=True).validate()
    config().validate()  # the rest of the configuration is fine there
