"""Fine-tuning that keeps short-context skills and retrieval (issue 16): the distillation term,
mixed context windows, needle-driven validation, document-masked packing, and their bad input."""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ORIGINAL, tiny_model
from longrope import models, nll, passkey, report, rotary, train
from longrope import scaling as sc
from longrope.cli import main
from longrope.errors import UsageError
from longrope.tokenization import byte_tokenizer
from longrope.train import retention
from test_finetune import SEQ, config, packed_data, text, write_data

HALF = 8  # frequency pairs of the tiny models (head_dim 16)


def scaling_with_short_factors():
    """LongRoPE whose short factors differ from 1 (and from the long ones): the regimes are told apart."""
    base = sc.make("longrope", ORIGINAL, SEQ, dim=16, base=10000.0)
    return dataclasses.replace(base, short_factor=tuple(1.0 + i / 8 for i in range(HALF)))


def final_hidden(model, ids, **kw):
    return nll.decoder(model)(input_ids=ids, use_cache=False, **kw).last_hidden_state


def full_logits(model, ids, **kw):
    with torch.no_grad():
        return nll.project(model, final_hidden(model, ids, **kw))


# --------------------------------------------------------------------------------------------
# 1. distillation toward the base model


def test_summed_kl_is_zero_for_the_teacher_itself_and_matches_full_logits_after_a_perturbation():
    model, ids = tiny_model(), torch.as_tensor(packed_data(ORIGINAL)[:2])
    teacher = retention.frozen_teacher(model, torch.device("cpu"))
    with torch.no_grad():
        same = nll.summed_kl(model, final_hidden(model, ids), teacher, final_hidden(teacher, ids), chunk=23)
    assert same.item() == 0.0
    down = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        down.add_(0.05 * torch.randn_like(down))
    hidden = final_hidden(model, ids)
    kl = nll.summed_kl(model, hidden, teacher, final_hidden(teacher, ids), chunk=23)
    kl.backward()
    student, reference = full_logits(model, ids), full_logits(teacher, ids)
    expected = F.kl_div(F.log_softmax(student, -1), F.log_softmax(reference, -1), reduction="sum", log_target=True)
    assert kl.item() > 1e-3 and torch.allclose(kl, expected, rtol=1e-4)
    assert down.grad.abs().sum() > 0  # the student learns
    assert all(p.grad is None for p in teacher.parameters())  # the teacher stays frozen


def seed_with_both_kinds(share: float, steps: int, grad_accum: int) -> int:
    """A seed whose plan has short and long micro-batches in its first step."""
    for seed in range(100):
        kinds = {retention.is_short_micro_batch(seed, share, 1, m) for m in range(grad_accum)}
        if kinds == {True, False}:
            return seed
    raise AssertionError("no seed mixes short and long micro-batches")


def test_a_step_loss_is_nll_plus_weighted_kl_on_the_short_sequences(tmp_path):
    scaling, packed, tok = scaling_with_short_factors(), packed_data(), byte_tokenizer()
    seed = seed_with_both_kinds(0.5, 1, 2)
    weight = 3.0
    cfg = config(steps=1, grad_accum=2, seed=seed, short_share=0.5, distill_weight=weight, gradient_checkpointing=False)
    result = train.finetune(tiny_model(), tok, scaling, packed, cfg, tmp_path / "ft")

    teacher, student = tiny_model(), tiny_model()  # the weights before the step; no scaling on the teacher
    models.attach(student, scaling)
    short_pool = retention.short_sequences(packed, ORIGINAL)
    total, kl_total, targets = 0.0, 0.0, 0
    for micro in range(2):
        short = retention.is_short_micro_batch(seed, 0.5, 1, micro)
        batch = train.finetune_batch(short_pool if short else packed, cfg, 1, micro)
        logits = full_logits(student, batch)[:, :-1]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        if short:
            taught = full_logits(teacher, batch)[:, :-1]
            kl_total += F.kl_div(F.log_softmax(logits, -1), F.log_softmax(taught, -1), reduction="sum",
                                 log_target=True).item()
        targets += batch.shape[0] * (batch.shape[1] - 1)
    assert kl_total / targets > 1e-3  # the term is there to be seen
    assert result.record["first_loss"] == pytest.approx((total + weight * kl_total) / targets, rel=1e-5)
    assert result.record["tokens_seen"] == 2 * (ORIGINAL + SEQ)


# --------------------------------------------------------------------------------------------
# 2. mixed context windows: what the rotary actually ran


def test_short_micro_batches_run_the_short_factors_and_long_ones_the_long(tmp_path, monkeypatch):
    scaling, packed, tok = scaling_with_short_factors(), packed_data(), byte_tokenizer()
    ran = []
    forward = rotary.ScaledRotaryEmbedding.forward

    def spy(self, x, position_ids, layer_type=None):
        length = position_ids.shape[-1]
        ran.append((length, self.scaling.regime(self.regime_length or int(position_ids.max()) + 1),
                    self.inv_freq64(length, position_ids.device).clone()))
        return forward(self, x, position_ids, layer_type)

    monkeypatch.setattr(rotary.ScaledRotaryEmbedding, "forward", spy)
    cfg = config(steps=6, grad_accum=2, short_share=0.4, seed=3, gradient_checkpointing=False, checkpoint_every=100)
    train.finetune(tiny_model(), tok, scaling, packed, cfg, tmp_path / "ft")

    plan = [retention.is_short_micro_batch(3, 0.4, step, m) for step in range(1, 7) for m in range(2)]
    assert 0 < sum(plan) < len(plan)  # both kinds occur
    assert [(length, regime) for length, regime, _ in ran] == [
        (ORIGINAL, "short") if short else (SEQ, "long") for short in plan]
    short_freq = scaling.inv_freq(16, 10000.0, ORIGINAL).double()
    long_freq = scaling.inv_freq(16, 10000.0, SEQ).double()
    assert not torch.allclose(short_freq, long_freq)
    for (_, regime, inv), short in zip(ran, plan):
        assert torch.equal(inv, short_freq if short else long_freq)


def test_short_sequences_cut_the_same_stream():
    packed = np.arange(2 * 10).reshape(2, 10)
    assert retention.short_sequences(packed, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [10, 11, 12, 13],
                                                             [14, 15, 16, 17]]


# --------------------------------------------------------------------------------------------
# 3. needle-driven validation


def needles(length: int = SEQ):
    tok = byte_tokenizer()
    docs = [tok(text(80, 100 + i))["input_ids"] for i in range(2)]
    return passkey.needle_samples(tok, docs, length, seed=0, depths=[0.1, 0.5, 0.9])


def answer_nll(model, samples) -> tuple[float, list[float]]:
    """Mean NLL of the answer tokens from transformers' full logits (not the lean forward), and each sample's own."""
    total, count, each = 0.0, 0, []
    for s in samples:
        with torch.no_grad():
            logits = model(input_ids=s.input_ids[None], use_cache=False).logits[0].float()
        scored = F.cross_entropy(logits[s.answer_start - 1:-1], s.input_ids[s.answer_start:], reduction="sum")
        total, count = total + scored.item(), count + s.answer_length
        each.append(scored.item() / s.answer_length)
    return total / count, each


def test_needle_loss_is_logged_every_n_steps_and_equals_an_independent_computation(tmp_path):
    model, samples = tiny_model(), needles()
    seen = {}

    def at_step(info):
        if info.step % 2 == 0:
            model.eval()
            seen[info.step] = answer_nll(model, samples)
            model.train()

    cfg = config(steps=5, needle_every=2, checkpoint_every=100)
    train.finetune(model, byte_tokenizer(), scaling_with_short_factors(), packed_data(), cfg, tmp_path / "ft",
                   callback=at_step, needles=samples)
    log = [json.loads(line) for line in (tmp_path / "ft" / train.LOG).read_text().splitlines()]
    logged = {e["step"]: e["needle_loss"] for e in log if "needle_loss" in e}
    assert sorted(logged) == [2, 4]
    for step, value in logged.items():
        assert value == pytest.approx(seen[step][0], abs=2e-5), step
    assert logged[2] != logged[4]  # measured on the model of that step
    # each needle's own loss, keyed by where its needle starts among the tokens before the question
    by_depth = {e["step"]: e["needle_loss_by_depth"] for e in log if "needle_loss" in e}
    depths = [f"{s.needle_start / s.answer_start:.2f}" for s in samples]
    assert len(set(depths)) == len(samples) > 1
    for step, values in by_depth.items():
        assert list(values) == depths
        assert list(values.values()) == pytest.approx(seen[step][1], abs=2e-5), step


PASSKEY_SEQ = 512  # the passkey prompt needs ~250 byte tokens; 8x the tiny model's context


def test_passkey_checks_are_logged_every_n_steps_match_transformers_generate_and_leave_training_alone(tmp_path):
    """--passkey-every: "passkey" at every second step equals the share of keys that transformers'
    own greedy `generate` finds on that step's model; the run trains exactly as without it."""
    tok = byte_tokenizer()
    prompts = retention.passkey_prompts(tok, PASSKEY_SEQ, seed=0)
    assert len(prompts) == 10 and {p.depth for p in prompts} == set(retention.PASSKEY_DEPTHS)
    assert all(p.actual_length <= PASSKEY_SEQ for p in prompts)
    model, seen, by_depth = tiny_model(), {}, collections.defaultdict(dict)

    def at_step(info):
        if info.step % 2 == 0:
            model.eval()
            found = 0
            for p in prompts:
                with torch.no_grad():
                    out = model.generate(torch.tensor([p.input_ids]), max_new_tokens=10, do_sample=False,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
                found += passkey.passkey_correct(tok.decode(out[0, len(p.input_ids):], skip_special_tokens=True),
                                                 p.key)
                by_depth[info.step][f"{p.depth:g}"] = by_depth[info.step].get(f"{p.depth:g}", 0) + \
                    passkey.passkey_correct(tok.decode(out[0, len(p.input_ids):], skip_special_tokens=True),
                                            p.key) / retention.PASSKEY_KEYS
            seen[info.step] = found / len(prompts)
            model.train()

    data = packed_data(PASSKEY_SEQ, n_docs=6, n_words=200)
    scaling = sc.make("longrope", ORIGINAL, PASSKEY_SEQ, dim=16, base=10000.0)
    cfg = config(steps=3, seq_len=PASSKEY_SEQ, batch_size=1, passkey_every=2, checkpoint_every=100)
    checked = train.finetune(model, tok, scaling, data, cfg, tmp_path / "checked", callback=at_step)
    log = [json.loads(line) for line in (tmp_path / "checked" / train.LOG).read_text().splitlines()]
    logged = {e["step"]: e["passkey"] for e in log if "passkey" in e}
    assert logged == pytest.approx(seen) and sorted(logged) == [2]
    assert [e["passkey_by_depth"] for e in log if "passkey" in e] == [pytest.approx(by_depth[2])]
    assert set(by_depth[2]) == {f"{d:g}" for d in retention.PASSKEY_DEPTHS}
    plain = train.finetune(tiny_model(), tok, scaling, data, dataclasses.replace(cfg, passkey_every=0),
                           tmp_path / "plain")
    for a, b in zip(checked.model.parameters(), plain.model.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# 4. packed documents with document-masked attention


def test_document_positions_restart_at_every_bos():
    batch = torch.tensor([[7, 1, 5, 6, 1, 9], [1, 4, 4, 4, 4, 1]])
    assert retention.document_positions(batch, 1).tolist() == [[0, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 0]]


BOUNDS = (0, 40, 80, SEQ)  # three documents, each shorter than the original context


def packed_documents(first_seed: int) -> torch.Tensor:
    tok = byte_tokenizer()
    docs = [tok(text(40, seed))["input_ids"][:end - start]
            for seed, start, end in zip((first_seed, 7, 8), BOUNDS, BOUNDS[1:])]
    return torch.tensor([sum(docs, [])])  # each starts with BOS


@pytest.mark.parametrize("doc_mask", [True, False])
def test_a_token_ignores_other_documents_in_its_pack_only_with_the_document_mask(doc_mask):
    model = tiny_model()
    models.attach(model, scaling_with_short_factors())
    a, b = packed_documents(1), packed_documents(2)
    assert not torch.equal(a[:, :40], b[:, :40]) and torch.equal(a[:, 40:], b[:, 40:])

    def logits(ids):
        kw = {"position_ids": retention.document_positions(ids, 1)} if doc_mask else {}
        with train.parallel.global_regime(model, SEQ):
            return full_logits(model, ids, **kw)[0, 40:]

    assert torch.allclose(logits(a), logits(b), atol=1e-5) == doc_mask


@pytest.mark.parametrize("checkpointing, keep_from", [
    (False, None), (True, SEQ), (True, SEQ + 1)])  # selective checkpointing (a long run's) and whole layers
def test_doc_mask_training_scores_each_document_by_itself(tmp_path, monkeypatch, checkpointing, keep_from):
    """The first step's loss of a --doc-mask run equals the documents' losses computed one by one."""
    if keep_from is not None:
        monkeypatch.setattr(sys.modules["longrope.train.finetune"], "KEEP_ATTENTION_FROM", keep_from)
    packed = np.concatenate([packed_documents(1).numpy(), packed_documents(2).numpy()])
    scaling = scaling_with_short_factors()
    cfg = config(steps=1, batch_size=2, doc_mask=True, gradient_checkpointing=checkpointing)
    result = train.finetune(tiny_model(), byte_tokenizer(), scaling, packed, cfg, tmp_path / "ft")
    model = tiny_model()
    models.attach(model, scaling)
    total = 0.0
    with train.parallel.global_regime(model, SEQ):  # the long factors, as in the packed sequence
        for row in torch.as_tensor(packed):
            for start, end in zip(BOUNDS, BOUNDS[1:]):  # each document alone predicts up to the next BOS
                logits = full_logits(model, row[None, start:end])[0]
                targets = row[start + 1:end + 1]
                total += F.cross_entropy(logits[:len(targets)], targets, reduction="sum").item()
    assert result.record["first_loss"] == pytest.approx(total / (2 * (SEQ - 1)), rel=1e-5)


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kw, message", [
    ({"short_share": 1.0}, "--short-share must be in [0, 1)"),
    ({"short_share": -0.1}, "--short-share must be in [0, 1)"),
    ({"distill_weight": -1.0}, "--distill-weight must be >= 0"),
    ({"distill_weight": 1.0}, "give --short-share > 0 too"),
    ({"needle_every": -1}, "--needle-every must be >= 0"),
    ({"passkey_every": -1}, "--passkey-every must be >= 0"),
    ({"retrieval_share": 1.5}, "--retrieval-share must be in [0, 1]"),
    ({"answer_weight": -1.0}, "--answer-weight must be >= 0"),
    ({"seen_margin": 0.5, "keep_angles_seen": True}, "--seen-margin must be >= 1"),
    ({"seen_margin": 1.5}, "--seen-margin applies with --keep-angles-seen"),
])
def test_bad_retention_settings_are_refused(kw, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        config(**kw).validate()


def test_needle_every_without_samples_is_refused_before_writing(tmp_path):
    with pytest.raises(UsageError, match="--needle-every"):
        train.finetune(tiny_model(), byte_tokenizer(), scaling_with_short_factors(), packed_data(),
                       config(needle_every=2), tmp_path / "ft")
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("extra, message", [
    (["--short-share", "1"], "--short-share must be in [0, 1)"),
    (["--distill-weight", "-0.5", "--short-share", "0.2"], "--distill-weight must be >= 0"),
    (["--distill-weight", "0.5"], "--distill-weight applies to the short sequences"),
    (["--needle-every", "2"], "--needle-every: needs --needle-data"),
])
def test_cli_bad_retention_options_are_one_line_exit_2_nothing_written(tiny_model_dir, tmp_path, capsys, extra,
                                                                       message):
    data = write_data(tmp_path / "docs.jsonl")
    code = main([str(a) for a in ["finetune", "--model", tiny_model_dir, "--method", "longrope", "--target-length",
                                  SEQ, "--data", data, "--steps", 2, "--out", tmp_path / "o", "--no-progress",
                                  *extra]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_cli_finetune_with_every_retention_option(tiny_model_dir, tmp_path, capsys):
    data, held = write_data(tmp_path / "docs.jsonl"), write_data(tmp_path / "held.jsonl", n_docs=2, n_words=100)
    out = tmp_path / "ft"
    code = main([str(a) for a in ["finetune", "--model", tiny_model_dir, "--method", "longrope", "--target-length",
                                  SEQ, "--data", data, "--steps", 4, "--lr", "1e-3", "--out", out, "--device", "cpu",
                                  "--short-share", "0.5", "--distill-weight", "0.5", "--doc-mask",
                                  "--needle-every", 2, "--needle-data", held, "--no-progress"]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    log = [json.loads(line) for line in (out / train.LOG).read_text().splitlines()]
    assert [e["step"] for e in log if "needle_loss" in e] == [2, 4]
    record = json.loads((out / train.FT_RECORD).read_text())
    assert record["config"]["short_share"] == 0.5 and record["identity"]["needle_data"]
    # the curves, plotted from that log
    assert "curves in training.png" in captured.out
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = report.training_curves(log)
    assert curves["needle loss"]["mean"] == [(e["step"], e["needle_loss"]) for e in log if "needle_loss" in e]


def test_training_curves_by_hand():
    """Each panel's lines from the step log; a step logged twice (resumed) keeps its later values,
    and fields the later entry lacks stay; depths in numeric order; no panel without its values."""
    log = [{"step": 1, "loss": 3.0},
           {"step": 2, "loss": 2.5, "needle_loss": 1.5, "needle_loss_by_depth": {"0.50": 1.0, "0.10": 2.0}},
           {"step": 2, "loss": 2.4},  # the same step again after a resume
           {"step": 4, "loss": 2.0, "needle_loss": 0.5, "needle_loss_by_depth": {"0.50": 0.25, "0.10": 0.75},
            "passkey": 0.8, "passkey_by_depth": {"0.05": 0.0, "0.5": 1.0}}]
    curves = report.training_curves(log)
    assert curves == {
        "loss": {"training loss": [(1, 3.0), (2, 2.4), (4, 2.0)]},
        "needle loss": {"mean": [(2, 1.5), (4, 0.5)], "depth 0.1": [(2, 2.0), (4, 0.75)],
                        "depth 0.5": [(2, 1.0), (4, 0.25)]},
        "passkey": {"all depths": [(4, 0.8)], "depth 0.05": [(4, 0.0)], "depth 0.5": [(4, 1.0)]}}
    assert list(curves["needle loss"]) == ["mean", "depth 0.1", "depth 0.5"]
    assert report.training_curves([{"step": 1, "loss": 3.0}]) == {"loss": {"training loss": [(1, 3.0)]}}
    window = report.LOSS_WINDOW
    ramp = report.training_curves([{"step": i, "loss": float(i)} for i in range(1, window + 3)])["loss"]
    # the running mean of the last `window` losses: steps 1..w, 2..w+1, 3..w+2
    assert ramp[f"mean of {window} steps"] == [(window + k, (window + 1) / 2 + k) for k in range(3)]


# --------------------------------------------------------------------------------------------
# 5. a weighted mix of data sources


def test_sources_are_drawn_in_proportion_to_their_weights_and_seeded():
    draws = [train.pick_source(3, [0.7, 0.3], step, micro) for step in range(1, 1001) for micro in range(2)]
    assert abs(draws.count(0) / len(draws) - 0.7) < 0.04
    assert draws == [train.pick_source(3, [7, 3], step, micro) for step in range(1, 1001) for micro in range(2)]
    assert draws != [train.pick_source(4, [0.7, 0.3], step, micro) for step in range(1, 1001) for micro in range(2)]
    assert {train.pick_source(0, [0.0, 1.0], s, 0) for s in range(1, 50)} == {1}
    assert {train.pick_source(0, [1.0], s, 0) for s in range(1, 50)} == {0}


def test_a_mixed_run_trains_on_each_source_as_drawn_and_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    tok = byte_tokenizer()
    first, second = packed_data(n_docs=4), packed_data(n_docs=3, n_words=90) + 7  # other tokens, told apart
    cfg = config(steps=6, checkpoint_every=2, grad_accum=2, batch_size=1)
    seen = []
    real = train.finetune_batch

    def spy(pack, *args, **kwargs):
        seen.append(2 if pack.max() > first.max() else 1)
        return real(pack, *args, **kwargs)

    monkeypatch.setattr(sys.modules["longrope.train.finetune"], "finetune_batch", spy)
    whole = train.finetune(tiny_model(), tok, scaling_with_short_factors(), [first, second], cfg, tmp_path / "a",
                           source_weights=[0.5, 0.5])
    expected = [1 + train.pick_source(cfg.seed, [0.5, 0.5], step, micro) for step in range(1, 7) for micro in range(2)]
    assert seen == expected and set(seen) == {1, 2}

    class Stop(Exception):
        pass

    def stop_at_5(info):
        if info.step == 5:
            raise Stop

    with pytest.raises(Stop):
        train.finetune(tiny_model(), tok, scaling_with_short_factors(), [first, second], cfg, tmp_path / "b",
                       source_weights=[0.5, 0.5], callback=stop_at_5)
    with pytest.raises(UsageError, match="source_weights"):  # the mix is part of what a resume must match
        train.finetune(tiny_model(), tok, scaling_with_short_factors(), [first, second], cfg, tmp_path / "b",
                       source_weights=[0.9, 0.1], resume=True)
    resumed = train.finetune(tiny_model(), tok, scaling_with_short_factors(), [first, second], cfg, tmp_path / "b",
                             source_weights=[0.5, 0.5], resume=True)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("extra, message", [
    (["--data-weights", "0.7"], "--data-weights: 1 weights for 2 --data sources"),
    (["--data-weights", "0.7,-0.3"], "weights must be numbers >= 0"),
    (["--data-weights", "0,0"], "not all 0"),
    (["--data-weights", "a,b"], "not a list of numbers"),
])
def test_cli_bad_data_weights_are_one_line_exit_2_nothing_written(tiny_model_dir, tmp_path, capsys, extra, message):
    a, b = write_data(tmp_path / "a.jsonl"), write_data(tmp_path / "b.jsonl", n_docs=2)
    try:
        code = main([str(x) for x in ["finetune", "--model", tiny_model_dir, "--method", "longrope", "--target-length",
                                      SEQ, "--data", a, b, "--steps", 2, "--out", tmp_path / "o", "--no-progress",
                                      *extra]])
    except SystemExit as exc:  # argparse's refusal of a value
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_cli_finetune_on_two_weighted_sources(tiny_model_dir, tmp_path, capsys):
    a, b = write_data(tmp_path / "a.jsonl"), write_data(tmp_path / "b.jsonl", n_docs=2)
    out = tmp_path / "ft"
    code = main([str(x) for x in ["finetune", "--model", tiny_model_dir, "--method", "longrope", "--target-length",
                                  SEQ, "--data", a, b, "--data-weights", "3,1", "--steps", 2, "--out", out,
                                  "--device", "cpu", "--no-progress"]])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / train.FT_RECORD).read_text())
    assert record["identity"]["source_weights"] == [3.0, 1.0] and len(record["identity"]["data"]) == 2


# --------------------------------------------------------------------------------------------
# 6. retrieval sequences: facts in the documents, questions at the end, answers weighted

RSEQ = 1024  # byte tokens: 4 facts and their questions (about 470) and more than one packed document


def decode(ids) -> str:
    return bytes(int(t) - 3 for t in ids if int(t) >= 3).decode()  # byte tokens start at 3 (BOS, EOS, PAD before)


def test_retrieval_sequences_hold_each_fact_once_and_score_exactly_its_answers():
    tok = byte_tokenizer()
    assert decode(tok("Az é")["input_ids"]) == "Az é"  # the decoding above is the tokenizer's
    row = np.asarray(packed_data(RSEQ, n_docs=8)[0])
    seq = retention.retrieval_sequence(row, tok, [5, 1, 0, 0])
    assert seq.ids.shape == row.shape == seq.answers.shape and seq.ids[0] == row[0] == tok.bos_token_id
    text = decode(seq.ids)
    assert "pass key" not in text and "magic number" not in text  # not the wording of what it is measured on
    facts = re.findall(r"\nThe access code for (\w+) is (\d+)\.\n", text)
    assert sorted(facts) == sorted(zip(seq.names, seq.codes)) and len(set(seq.names)) == 4
    assert all(len(c) == retention.RETRIEVAL_DIGITS for c in seq.codes)
    for start, name, code in zip(seq.fact_starts, seq.names, seq.codes):  # where the sequence says
        assert decode(seq.ids[start:]).startswith(f"\nThe access code for {name} is {code}.")
    # the documents, facts taken out, are the row's first tokens in order
    kept = np.ones(len(seq.ids), dtype=bool)
    for start, name, code in zip(seq.fact_starts, seq.names, seq.codes):
        kept[start:start + len(f"\nThe access code for {name} is {code}.\n")] = False
    tail_start = text.index("\nQ: ")
    body = seq.ids[kept][:int(kept[:tail_start].sum())]
    assert np.array_equal(body, row[:len(body)])
    # each question is answered with its own fact's code, and the answer mask covers exactly those codes
    qa = re.findall(r"\nQ: What is the access code for (\w+)\? A: The access code for \1 is (\d+)", text[tail_start:])
    assert sorted(qa) == sorted(facts) and text.endswith(f" {qa[-1][1]}")
    runs = re.findall(r"\d+", decode(np.where(seq.answers, seq.ids, tok.encode(" ")[0] + 0 * seq.ids)))
    assert runs == [code for _, code in qa]
    # seeded
    again = retention.retrieval_sequence(row, tok, [5, 1, 0, 0])
    assert np.array_equal(again.ids, seq.ids) and again.codes == seq.codes
    assert retention.retrieval_sequence(row, tok, [5, 1, 0, 1]).codes != seq.codes
    with pytest.raises(ValueError, match="too short"):
        retention.retrieval_sequence(row[:300], tok, [5])


def test_the_answer_term_counts_answer_weight_times_the_answers_mean_nll():
    model, tok = tiny_model(), byte_tokenizer()
    rows = packed_data(RSEQ, n_docs=8)[:2]
    seqs = [retention.retrieval_sequence(r, tok, [0, i]) for i, r in enumerate(rows)]
    ids = torch.as_tensor(np.stack([s.ids for s in seqs]))
    answers = torch.as_tensor(np.stack([s.answers for s in seqs]))
    weight = 2.5
    summed, targets = train.parallel.chunked_lm_loss(model, ids, 100, answers=answers, answer_weight=weight)
    logits = full_logits(model, ids)[:, :-1]
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    scored = answers[:, 1:].reshape(-1)
    # " CODE": a byte each
    assert targets == 2 * (RSEQ - 1) and int(scored.sum()) == 2 * 4 * (1 + retention.RETRIEVAL_DIGITS)
    expected = per_token.sum() + weight * targets * per_token[scored].mean()
    assert summed.item() == pytest.approx(expected.item(), rel=1e-5)
    plain, _ = train.parallel.chunked_lm_loss(model, ids, 100)
    assert plain.item() == pytest.approx(per_token.sum().item(), rel=1e-5) and summed.item() > plain.item() * 1.5


def test_retrieval_micro_batches_are_trained_as_built_and_read_whole_under_doc_masks(tmp_path):
    tok = byte_tokenizer()
    packed = packed_data(RSEQ, n_docs=12)
    seed = next(s for s in range(100) if [retention.is_retrieval_micro_batch(s, 0.5, 1, m) for m in range(2)]
                == [True, False])
    scaling = sc.make("longrope", ORIGINAL, RSEQ, dim=16, base=10000.0)
    cfg = config(seq_len=RSEQ, steps=1, grad_accum=2, batch_size=1, seed=seed, retrieval_share=0.5, answer_weight=2.0,
                 doc_mask=True, gradient_checkpointing=False)
    result = train.finetune(tiny_model(), tok, scaling, packed, cfg, tmp_path / "ft")

    model = tiny_model()  # the weights before the step
    models.attach(model, scaling)
    total = 0.0
    for micro in range(2):
        batch = train.finetune_batch(packed, cfg, 1, micro)
        if micro == 0:  # the retrieval one: built from the same row, read without restarting positions
            seq = retention.retrieval_sequence(batch[0].numpy(), tok, [seed, 1, 0, 0])
            assert (seq.ids[1:] == tok.bos_token_id).any()  # a document mask would cut it
            ids = torch.as_tensor(seq.ids)[None]
            logits = full_logits(model, ids)[0, :-1]
            per_token = F.cross_entropy(logits, ids[0, 1:], reduction="none")
            answer_mean = per_token[torch.as_tensor(seq.answers[1:])].mean().item()
            total += per_token.sum().item() + 2.0 * (RSEQ - 1) * answer_mean
        else:  # an ordinary one, document-masked
            positions = retention.document_positions(batch, tok.bos_token_id)
            with train.parallel.global_regime(model, RSEQ):
                logits = full_logits(model, batch, position_ids=positions)[0, :-1]
            total += F.cross_entropy(logits, batch[0, 1:], reduction="sum").item()
    assert result.record["first_loss"] == pytest.approx(total / (2 * (RSEQ - 1)), rel=1e-5)


def test_retrieval_in_sequences_too_short_for_the_facts_is_refused_before_writing(tmp_path):
    with pytest.raises(UsageError, match="--retrieval-share: a sequence of 128 tokens is too short"):
        train.finetune(tiny_model(), byte_tokenizer(), scaling_with_short_factors(), packed_data(),
                       config(retrieval_share=0.5), tmp_path / "ft")
    assert not (tmp_path / "ft").exists()
