"""Progressive extension: the plan, stage skipping on resume, readjustment, the facade, the CLI."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ORIGINAL, tiny_model
from longrope import runs, data as D
from longrope import evaluate, models, pipeline, train
from longrope import scaling as sc
from longrope import search as S
from longrope.cli import main
from longrope.errors import UsageError
from longrope.facade import LongRoPEModel
from longrope.pipeline import Stage, parse_stages
from longrope.report import write_extend_report
from longrope.tokenization import byte_tokenizer

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards hex jolly zebras".split()
TINY_SEARCH = S.SearchConfig(population=6, mutations=2, crossovers=2, parents=3, generations=1)


def text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))



@pytest.fixture(scope="module")
def docs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": text(120, i)}) + "\n" for i in range(3)))
    return path  # three documents of ~600 tokens


def tokenized(path):
    return D.load_tokenized(path, byte_tokenizer(), cache=False)


def config(stages: str, target: int, **kw) -> pipeline.PipelineConfig:
    from longrope import train

    base = dict(target_length=target, stages=parse_stages(stages), samples=2, search=TINY_SEARCH,
                finetune=train.FinetuneConfig(seq_len=2, steps=2, lr=1e-3, warmup=0, checkpoint_every=1),
                report_lengths=(64, 256), report_docs=1, passkey_trials=0)
    base.update(kw)
    return pipeline.PipelineConfig(**base)


# --------------------------------------------------------------------------------------------
# the plan


def test_parse_stages():
    assert parse_stages("search:64k, finetune:64k:400,SEARCH:2048k:4") == (
        Stage("search", 65536), Stage("finetune", 65536, 400), Stage("search", 2097152, 4))
    assert Stage("search", 2097152, 4).label == "search:2048k:4"
    assert Stage("finetune", 65536, 400).label == "finetune:64k:400"
    assert Stage("search", 2097152).folder(3) == "stage-03-search-2048k"


@pytest.mark.parametrize("bad, message", [
    ("", "empty plan"), ("search:64k,,search:128k", "empty stage"), ("serch:64k", "unknown stage 'serch'"),
    ("search", "not KIND:LENGTH"), ("search:64k:3:1", "not KIND:LENGTH"),
    ("search:64k:0", "evaluations must be a positive integer"), ("search:lots", "not a length"),
    ("finetune:64k:x", "steps must be a positive integer"), ("search:0", "not a length"),
    ("carry:128k:2", "not KIND:LENGTH"),
])
def test_parse_stages_rejects_bad_plans(bad, message):
    with pytest.raises(UsageError, match=message):
        parse_stages(bad)


def test_check_plan():
    pipeline.check_plan(parse_stages("search:128,search:256"), 64, 256)
    with pytest.raises(UsageError, match="must be above the model's context 64"):
        pipeline.check_plan(parse_stages("search:64"), 64, 64)
    with pytest.raises(UsageError, match="search:512 must be above .* at most --target-length 256"):
        pipeline.check_plan(parse_stages("search:512"), 64, 256)
    with pytest.raises(UsageError, match="last stage .* must be at --target-length"):
        pipeline.check_plan(parse_stages("search:256,search:128"), 64, 256)
    pipeline.check_plan(parse_stages("finetune:128,carry:256"), 64, 256)
    with pytest.raises(UsageError, match="carry:256 carries an earlier stage's factors; put a search or finetune stage "
                                         "before it, e.g. finetune:128,carry:256"):
        pipeline.check_plan(parse_stages("carry:256"), 64, 256)
    assert pipeline.default_report_lengths(64, 256) == (64, 128, 256)
    long = pipeline.default_report_lengths(4096, 2 * 1024 * 1024)
    assert len(long) == pipeline.MAX_REPORT_LENGTHS and long[0] == 4096 and long[-1] == 2 * 1024 * 1024


def test_rescaled_seed_keeps_ones_and_maps_s_to_new_s():
    out = sc.rescale_factors([1.0, 2.0, 4.0], 4.0, 16.0)
    assert out == pytest.approx((1.0, 4.0, 16.0))


# --------------------------------------------------------------------------------------------
# the pipeline, with stage calls counted


class Boom(Exception):
    pass


def counting_runners(calls: dict, fail_on: str | None = None):
    def wrap(kind, fn):
        def runner(ctx, stage, folder):
            calls[kind] = calls.get(kind, 0) + 1
            if kind == fail_on and calls[kind] == 1:
                fn(ctx, stage, folder)  # the work is done, but the stage's marker is never written
                raise Boom
            return fn(ctx, stage, folder)
        return runner
    return {kind: wrap(kind, fn) for kind, fn in pipeline.RUNNERS.items()}


def test_pipeline_runs_stages_in_order_and_skips_finished_ones_on_resume(tiny_model_dir, docs_file, tmp_path):
    docs, tok = tokenized(docs_file), byte_tokenizer()
    cfg = config("search:128,finetune:128:2,search:256:3", 256)  # the last search: 3 evaluations at most
    out = tmp_path / "ext"
    calls: dict = {}
    with pytest.raises(Boom):
        pipeline.extend(str(tiny_model_dir), tok, docs, cfg, out, runners=counting_runners(calls, "finetune"),
                        log=lambda m: None)
    assert calls == {"search": 1, "finetune": 1}
    assert (out / "stage-01-search-128" / pipeline.MARKER).is_file()
    assert not (out / "stage-02-finetune-128" / pipeline.MARKER).exists()
    with pytest.raises(UsageError, match="pass --resume"):
        pipeline.extend(str(tiny_model_dir), tok, docs, cfg, out, log=lambda m: None)
    with pytest.raises(UsageError, match="different stages"):
        pipeline.extend(str(tiny_model_dir), tok, docs, config("search:256", 256), out, resume=True,
                        log=lambda m: None)

    result = pipeline.extend(str(tiny_model_dir), tok, docs, cfg, out, resume=True,
                             runners=counting_runners(calls), log=lambda m: None,
                             render_report=write_extend_report)
    # stage 1 skipped; the finetune stage ran again (it finds its finished output), then the rest
    assert calls == {"search": 2, "finetune": 2, "readjust": 1}
    assert [m["stage"] for m in result.stages] == ["search:128", "finetune:128:2", "search:256:3", "readjust:64"]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([runs.MARKER, "plan.json", "extend.json", "model", "report.md", "report.json", "report.png",
                            "stage-01-search-128", "stage-02-finetune-128", "stage-03-search-256",
                            "stage-04-readjust-64"])

    # the search after the fine-tune used the fine-tuned model and was seeded with stage 1's factors
    state = json.loads((out / "stage-03-search-256" / S.STATE).read_text())
    assert state["identity"]["model"] == "stage:stage-02-finetune-128"
    first = tuple(json.loads((out / "stage-01-search-128" / S.SCALING).read_text())["long_factor"])
    assert state["identity"]["seeds"][0][0] == list(first)
    history = S.read_history(out / "stage-03-search-256")
    space = S.SearchSpace(16, 10000.0, ORIGINAL, 256)
    assert history[0]["factors"] == list(space.lambdas(space.snap(first)))  # evaluated first
    carried = sc.rescale_factors(first, 128 / ORIGINAL, 256 / ORIGINAL)
    assert history[1]["factors"] == list(space.lambdas(space.snap(carried)))  # then carried to the new scale
    assert len(history) == 3  # search:256:3

    # the final checkpoint carries the last search's long factors and the readjusted short ones
    final = result.scaling
    assert final.target_length == 256
    assert final.long_factor == tuple(json.loads((out / "stage-03-search-256" / S.SCALING).read_text())["long_factor"])
    exported = json.loads((out / "model" / "config.json").read_text())
    assert exported["rope_scaling"]["short_factor"] == list(final.short_factor)
    report = json.loads((out / "report.json").read_text())
    assert [r["length"] for r in report["results"]] == [64, 256]
    assert all(r["ppl"] is not None and r["ppl"] > 1 for r in report["results"])
    assert "| 256 |" in (out / "report.md").read_text()

    # everything done: a further resume runs nothing
    again = pipeline.extend(str(tiny_model_dir), tok, docs, cfg, out, resume=True,
                            runners=counting_runners(calls), log=lambda m: None)
    assert calls == {"search": 2, "finetune": 2, "readjust": 1}
    assert again.scaling == final


def test_bad_pipeline_input_is_refused_before_anything_is_written(tiny_model_dir, docs_file, tmp_path):
    docs, tok = tokenized(docs_file), byte_tokenizer()
    for stages, target, message in [
        ("search:4096", 4096, "search:4k needs a document of 4096 tokens"),
        ("finetune:4096", 4096, "finetune:4k: the documents hold about"),
        ("search:32", 32, "must be above the model's context 64"),
    ]:
        with pytest.raises(UsageError, match=message):
            pipeline.extend(str(tiny_model_dir), tok, docs, config(stages, target), tmp_path / "x",
                            log=lambda m: None)
        assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------
# short-context readjustment


def test_readjusted_short_factors_are_never_worse_than_all_ones(docs_file):
    model = tiny_model()
    docs = tokenized(docs_file)
    windows = [torch.as_tensor(d.tokens[:ORIGINAL]) for d in docs]
    # a long scaling whose attention factor disturbs short sequences (as at large scales)
    long = sc.make("longrope", ORIGINAL, 1024, dim=16, base=10000.0, attention_setting=1.3)
    models.attach(model, long)
    ones = evaluate.perplexity(model, windows)
    for evals in (1, 5, 40):
        space = S.ShortFactorSpace.for_scaling(long, 16, 10000.0, cap=1.5)
        config = S.SearchConfig(population=8, mutations=4, crossovers=4, parents=4, generations=4, max_evals=evals)
        result = S.run(space, S.model_fitness(model, windows), config)
        short = result.scaling.short_factor
        assert result.scaling.long_factor == long.long_factor and result.scaling.attention_factor() == pytest.approx(1.3)
        assert all(1.0 <= v <= 1.5 for v in short) and list(short) == sorted(short)
        models.attach(model, result.scaling)
        readjusted = evaluate.perplexity(model, windows)
        assert readjusted <= ones, (evals, readjusted, ones)
        if evals == 1:
            assert short == (1.0,) * 8  # all-ones is the first candidate
    assert readjusted < ones  # with a real budget the search finds better than all-ones here


def test_readjustment_with_the_model_s_own_temperature_gives_back_the_base_model(tiny_model_dir, docs_file, tmp_path):
    """readjust_attention="one" (the default): inside the original window the all-ones candidate
    is the base model itself when nothing was fine-tuned (short factors 1, attention factor 1),
    whatever the long scaling's attention factor, so the readjusted export is never worse than the
    base model there; "keep" leaves the long factor on short inputs (whether that costs depends on
    the model: this untrained one even gains from the sharper attention)."""
    docs, tok = tokenized(docs_file), byte_tokenizer()
    base, _ = models.load(str(tiny_model_dir))
    by_id = {d.id: d for d in docs}
    ppl = {}
    for mode in ("one", "keep"):
        result = pipeline.extend(str(tiny_model_dir), tok, docs, config("search:512", 512, readjust_attention=mode),
                                 tmp_path / mode, log=lambda m: None)
        scaling = result.scaling
        assert scaling.attention_factor() > 1.2  # sqrt(1 + ln 8 / ln 64)
        assert scaling.attention_factor(ORIGINAL) == (1.0 if mode == "one" else scaling.attention_factor())
        readjust = json.loads((tmp_path / mode / "stage-02-readjust-64" / pipeline.MARKER).read_text())["summary"]
        assert readjust["short_attention_factor"] == scaling.attention_factor(ORIGINAL)
        windows = [torch.as_tensor(by_id[i].tokens[:ORIGINAL]) for i in readjust["documents"]]
        model, _ = models.load(str(result.model_dir))  # the export, as a user loads it
        ppl[mode] = evaluate.perplexity(model, windows)
        assert ppl[mode] == pytest.approx(readjust["fitness"], rel=1e-5)
        if mode == "one":
            base_ppl = evaluate.perplexity(base, windows)
            assert readjust["all_ones_fitness"] == pytest.approx(base_ppl, rel=1e-5)
            assert ppl[mode] <= base_ppl * (1 + 1e-5)
        # the report puts the base model beside the extended one inside the original window
        row = json.loads((tmp_path / mode / "report.json").read_text())["results"][0]
        windows = [torch.as_tensor(by_id[i].tokens[:ORIGINAL]) for i in row["documents"]]
        assert row["length"] == ORIGINAL and row["base_ppl"] == pytest.approx(evaluate.perplexity(base, windows), rel=1e-5)


# --------------------------------------------------------------------------------------------
# the LongRoPEModel facade


def test_longrope_model_facade(tmp_path):
    torch.manual_seed(0)
    model = LongRoPEModel(d_model=32, n_heads=2, num_layers=1, base_length=32)
    assert model.hf_model.config.head_dim == 16 and model.max_length == 32
    texts = [text(80, i) for i in range(3)]
    extended = model.extend_context(texts, 128, out=tmp_path / "facade", finetune_steps=2, samples=1,
                                    search=TINY_SEARCH, report_lengths=(32, 128), log=lambda m: None)
    assert extended is model  # in place, and the model itself back (the seed's `model = model.extend_context(...)`)
    result = model.last_extension
    assert [m["stage"] for m in result.stages] == ["search:64", "finetune:64:2", "search:128", "readjust:32"]
    assert model.max_length == 128 and model.scaling.target_length == 128
    logits = model(torch.randint(0, 259, (2, 128)))
    assert logits.shape == (2, 128, 259) and torch.isfinite(logits).all()
    saved = model.save(tmp_path / "saved")
    assert json.loads((saved / "config.json").read_text())["max_position_embeddings"] == 128
    with pytest.raises(UsageError, match="above the model's context 32"):
        model.extend_context(texts, 32)
    with pytest.raises(UsageError, match="multiple of n_heads"):
        LongRoPEModel(d_model=30, n_heads=4)


# --------------------------------------------------------------------------------------------
# command line


SMALL = ["--samples", "1", "--population", "6", "--mutations", "2", "--crossovers", "2", "--parents", "3",
         "--generations", "1", "--report-lengths", "64,128", "--report-docs", "1", "--passkey-trials", "0"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_extend_end_to_end(tiny_model_dir, docs_file, tmp_path, capsys):
    out = tmp_path / "ext"
    code, stdout, _ = run(capsys, "extend", "--model", tiny_model_dir, "--data", docs_file, "--target-length", 128,
                          "--stages", "search:128", "--out", out, "--device", "cpu", *SMALL)
    assert code == 0 and "wrote" in stdout and "perplexity" in stdout
    assert (out / "model" / "config.json").is_file() and (out / pipeline.DONE).is_file()
    code, stdout, _ = run(capsys, "extend", "--model", tiny_model_dir, "--data", docs_file, "--target-length", 128,
                          "--stages", "search:128", "--out", out, "--device", "cpu", "--resume", *SMALL)
    assert code == 0 and "already complete" in stdout


def test_cli_extend_finetune_stages_take_the_retention_options(tiny_model_dir, docs_file, tmp_path, capsys):
    out = tmp_path / "ext"
    code, _, err = run(capsys, "extend", "--model", tiny_model_dir, "--data", docs_file, "--target-length", 128,
                       "--stages", "finetune:128:2", "--out", out, "--device", "cpu", "--no-readjust",
                       "--short-share", "0.5", "--distill-weight", "0.25", "--doc-mask", *SMALL)
    assert code == 0, err
    records = list(out.glob(f"**/{train.FT_RECORD}"))
    assert len(records) == 1
    config = json.loads(records[0].read_text())["config"]
    assert (config["short_share"], config["distill_weight"], config["doc_mask"]) == (0.5, 0.25, True)


def test_cli_extend_finetune_stages_take_retrieval_exercises_and_the_schedule(tiny_model_dir, docs_file, tmp_path,
                                                                            capsys):
    out = tmp_path / "ext"  # 640 tokens: a byte-level sequence holds the 4 facts and their questions
    code, _, err = run(capsys, "extend", "--model", tiny_model_dir, "--data", docs_file, "--target-length", 640,
                       "--stages", "finetune:640:1", "--out", out, "--device", "cpu", "--no-readjust",
                       "--retrieval-share", "1", "--answer-weight", "2", "--schedule", "cosine", "--min-lr-ratio", "0.1",
                       *SMALL)
    assert code == 0, err
    config = json.loads(next(out.glob(f"**/{train.FT_RECORD}")).read_text())["config"]
    assert (config["retrieval_share"], config["answer_weight"], config["schedule"], config["min_lr_ratio"]) == \
        (1.0, 2.0, "cosine", 0.1)


def test_cli_extend_finetune_stages_keep_angles_seen_and_carry_that_scaling_on(tiny_model_dir, docs_file, tmp_path,
                                                                              capsys, monkeypatch):
    """--keep-angles-seen in a finetune stage: the stage trains and exports the raised factors, and
    the pipeline's current scaling afterwards is that one (what the report and later stages use);
    a carry stage after it takes them to twice the length, λ^(ln 20/ln 10), into the final export."""
    low = sc.LongRoPEScaling(long_factor=[1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0, 2.2], factor=640 / ORIGINAL,
                             original_max_position_embeddings=ORIGINAL)
    monkeypatch.setattr(pipeline.stages, "stage_scaling", lambda ctx, length: low)
    carried = []
    real = pipeline.stages.RUNNERS["finetune"]
    monkeypatch.setitem(pipeline.stages.RUNNERS, "finetune", lambda *a: carried.append(real(*a)) or carried[-1])
    out = tmp_path / "ext"
    code, _, err = run(capsys, "extend", "--model", tiny_model_dir, "--data", docs_file, "--target-length", 1280,
                       "--stages", "finetune:640:1,carry:1280", "--out", out, "--device", "cpu", "--no-readjust",
                       "--keep-angles-seen", "--seen-margin", "1.2", *SMALL)
    assert code == 0, err
    record = next(out.glob(f"**/{train.FT_RECORD}"))
    raised = [1.0, 1.1, 1.2, 12.0, 12.0, 12.0, 12.0, 12.0]  # pairs 3-7 never turn in 64 positions; 1.2 · s, s = 10
    assert json.loads(record.read_text())["config"]["keep_angles_seen"] is True
    assert json.loads((record.parent / "config.json").read_text())["rope_scaling"]["long_factor"] == raised
    assert list(carried[0].scaling.long_factor) == raised
    final = json.loads((out / "model" / "config.json").read_text())["rope_scaling"]
    power = math.log(20) / math.log(10)
    assert final["long_factor"] == pytest.approx([v ** power for v in raised]) and final["factor"] == 20
    assert final["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(20) / math.log(ORIGINAL)))
    assert "carry:1280 | factors carried from scale 10 to 20, no search" in (out / "report.md").read_text()
    assert (record.parent / "training.png").read_bytes()[:4] == b"\x89PNG"  # the stage's curves, from its log


def test_cli_extend_keep_angles_seen_holds_in_search_stages_too(tiny_model_dir, docs_file, tmp_path, capsys):
    """A search stage under --keep-angles-seen searches only scalings whose unturned pairs are at s
    or above: its result, and every candidate in its history, keeps every angle seen up to (L-1)·s."""
    out = tmp_path / "ext"
    code, _, err = run(capsys, "extend", "--model", tiny_model_dir, "--data", docs_file, "--target-length", 256,
                       "--stages", "search:256", "--out", out, "--device", "cpu", "--no-readjust",
                       "--keep-angles-seen", *SMALL)
    assert code == 0, err
    info = models.rope_info(models.load_config(tiny_model_dir))
    exported = sc.from_dict(json.loads(next(out.glob("**/config.json")).read_text())["rope_scaling"], info.dim)
    assert sc.seen_distance(exported, info.dim, info.base, ORIGINAL, 256) >= 4 * (ORIGINAL - 1) - 1e-9
    history = [json.loads(line) for f in out.glob("**/history.jsonl") for line in f.read_text().splitlines()]
    unturned = sc.unturned_pairs(info.dim, info.base, ORIGINAL).tolist()
    assert history and all(min(f for f, u in zip(h["factors"], unturned) if u) >= 4.0 for h in history)


def test_cli_extend_refuses_retrieval_exercises_in_too_short_stages_before_writing(tiny_model_dir, docs_file, tmp_path,
                                                                                  capsys):
    out = tmp_path / "ext"
    code, _, err = run(capsys, "extend", "--model", tiny_model_dir, "--data", docs_file, "--target-length", 640,
                       "--stages", "search:128,finetune:128:1,search:640", "--out", out, "--device", "cpu",
                       "--retrieval-share", "0.5", *SMALL)
    assert code == 2 and "--retrieval-share: a sequence of 128 tokens is too short" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_cli_extend_max_stages_pauses_and_resume_finishes(tiny_model_dir, docs_file, tmp_path, capsys):
    """--max-stages N: N stages now (skipped ones do not count), a clean stop, --resume the rest."""
    out = tmp_path / "ext"
    args = ["extend", "--model", tiny_model_dir, "--data", docs_file, "--target-length", 256,
            "--stages", "search:128,search:256", "--out", out, "--device", "cpu", *SMALL]
    code, stdout, _ = run(capsys, *args, "--max-stages", 1)
    assert code == 0 and "paused after --max-stages 1" in stdout
    assert (out / "stage-01-search-128" / pipeline.MARKER).is_file() and not (out / "stage-02-search-256").exists()
    assert not (out / "model").exists() and not (out / pipeline.DONE).exists()
    code, stdout, _ = run(capsys, *args, "--resume", "--max-stages", 1)  # stage 1 skipped, stage 2 runs
    assert code == 0 and "paused" in stdout and (out / "stage-02-search-256" / pipeline.MARKER).is_file()
    code, stdout, _ = run(capsys, *args, "--resume")  # readjust, export, report
    assert code == 0 and "wrote" in stdout and (out / pipeline.DONE).is_file()
    code, _, stderr = run(capsys, *args, "--resume", "--max-stages", 0)
    assert code == 2 and "--max-stages must be at least 1" in stderr


@pytest.mark.parametrize("extra, message", [
    (["--stages", "search:128;finetune:128"], "--stages: 'search:128;finetune:128'"),
    (["--stages", "grow:128"], "unknown stage 'grow'"),
    (["--target-length", "64", "--stages", "search:64"], "--target-length 64 must be above the model's context 64"),
    (["--stages", "search:2k", "--target-length", "2k"], "needs a document of 2048 tokens"),
    (["--stages", "finetune:4k", "--target-length", "4k"], "finetune:4k: the documents hold about"),
])
def test_cli_extend_bad_input_is_one_line(tiny_model_dir, docs_file, tmp_path, capsys, extra, message):
    argv = ["extend", "--model", tiny_model_dir, "--data", docs_file, "--target-length", "128", "--out",
            tmp_path / "o", *SMALL, *extra]
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_cli_extend_resumes_after_sigkill(tiny_model_dir, docs_file, tmp_path, capsys):
    """Kill the process during the fine-tune stage: --resume skips the finished search and
    continues the fine-tune from its last checkpoint."""
    out = tmp_path / "ext"
    argv = ["extend", "--model", str(tiny_model_dir), "--data", str(docs_file), "--target-length", "128",
            "--stages", "search:128,finetune:128:40", "--out", str(out), "--device", "cpu", "--lr", "1e-4",
            "--checkpoint-every", "1", "--no-readjust", *SMALL]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "longrope", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    checkpoint = out / "stage-02-finetune-128" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and not (out / pipeline.DONE).exists()
    first_marker = out / "stage-01-search-128" / pipeline.MARKER
    stamp = first_marker.stat().st_mtime_ns

    code, stdout, _ = run(capsys, *argv, "--resume")
    assert code == 0 and "stage 1/2 search:128: done before, skipped" in stdout
    assert first_marker.stat().st_mtime_ns == stamp
    log = [json.loads(x) for x in (out / "stage-02-finetune-128" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 41))  # every step once, none lost or repeated
    assert (out / pipeline.DONE).is_file()


@pytest.mark.torchrun
def test_cli_extend_under_torchrun_matches_one_process(tiny_model_dir, docs_file, tmp_path, capsys):
    """Two ranks (torchrun, gloo): the searches split each generation and equal one process's; the
    fine-tune runs context-parallel; rank 0 alone writes; --resume then finds it complete."""
    plan = ["--target-length", "256", "--stages", "search:128,finetune:128:2,search:256", "--device", "cpu",
            "--readjust-evals", "4", "--finetune-steps", "2", *SMALL]
    code, _, _ = run(capsys, "extend", "--model", tiny_model_dir, "--data", docs_file, "--out", tmp_path / "one", *plan)
    assert code == 0
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache2"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "longrope", "extend", "--model", str(tiny_model_dir), "--data", str(docs_file),
           "--out", str(tmp_path / "two"), *[str(a) for a in plan]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # rank 0 reports, rank 1 is quiet
    one = json.loads((tmp_path / "one" / pipeline.DONE).read_text())["stages"]
    two = json.loads((tmp_path / "two" / pipeline.DONE).read_text())["stages"]
    assert [m["stage"] for m in two] == [m["stage"] for m in one]
    assert two[0]["scaling"] == one[0]["scaling"] and two[0]["summary"]["fitness"] == one[0]["summary"]["fitness"]
    assert abs(two[1]["summary"]["final_loss"] - one[1]["summary"]["final_loss"]) < 1e-3
    assert (tmp_path / "two" / "model" / "config.json").is_file()
    assert json.loads((tmp_path / "two" / "stage-02-finetune-128" / "finetune.json").read_text())["processes"] == 2
    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "already complete" in resumed.stdout, resumed.stderr[-3000:]
    # bad input that every rank meets: exit 2 and one line, from rank 0
    bad = [a if a != "search:128,finetune:128:2,search:256" else "search:2k" for a in cmd]
    bad[bad.index("256")] = "2k"  # --target-length
    failed = subprocess.run(bad + ["--force"], env=env, capture_output=True, text=True, timeout=600)
    assert failed.returncode != 0 and (failed.stdout + failed.stderr).count("longrope: error:") == 1, failed.stderr
