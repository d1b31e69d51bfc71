"""`longrope eval ruler` end to end on tiny models: its outputs, per-cell resume after a kill,
the resume identity, --chat, the bundled model's NIAH score, a scaling's reach."""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import ORIGINAL
from longrope import cli, evaluate, models, runs
from longrope import scaling as sc
from longrope.evaluate import ruler, ruler_suite
from longrope.tokenization import byte_tokenizer

BUNDLED = Path(models.__file__).parent / "bundled" / "tiny-llama-256"
TIMINGS = ("seconds", "peak_memory_bytes")  # differ between two runs of the same cells


def ruler_argv(model, out, *extra, lengths="1024", tasks=None):
    argv = ["eval", "ruler", "--model", str(model), "--lengths", lengths, "--depths", "0.2,0.8", "--samples", "1",
            "--max-new-tokens", "3", "--device", "cpu", "--quiet", *extra]
    if tasks:
        argv += ["--tasks", tasks]
    return argv + (["--out", str(out)] if out is not None else [])


def records_of(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["records"]


def without_timings(records):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def test_run_writes_results_table_csv_heatmap(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(ruler_argv(tiny_model_dir, out, "--compare", "yarn,linear", lengths="1024,2048")) == 0
    stdout = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    records = results["records"]
    assert results["command"] == "ruler" and results["config"]["tasks"] == list(ruler.TASKS)
    # 4 niah tasks and vt at 2 depths, cwe and fwe once; 2 lengths, 2 methods, 1 sample
    assert len(records) == (5 * 2 + 2) * 2 * 2
    assert {(r["task"], r["depth"]) for r in records if r["task"] in ("cwe", "fwe")} == {("cwe", None), ("fwe", None)}
    tokenizer = byte_tokenizer()
    prompts = evaluate.Prompts(tokenizer, seed=0)
    for r in records:
        assert r["score"] == ruler.score(r["task"], r["output"], r["answers"]) and 0 <= r["score"] <= 1
        assert r["length"] - 64 <= r["actual_length"] <= r["length"] and 1 <= r["new_tokens"] <= 3
        # the sample is the cell's, the same for both methods (the answers of a remade sample)
        cell = ruler_suite.Cell(r["task"], r["length"], r["depth"], r["sample"])
        assert prompts.sample(cell).answers == r["answers"] and prompts.seed_of(cell) == r["seed"]
    # each method is configured for the length it is evaluated at
    scalings = {(s["method"], s["length"]): s["scaling"] for s in results["scalings"]}
    assert scalings["yarn", 2048]["factor"] == 2048 / ORIGINAL and scalings["linear", 1024]["rope_type"] == "linear"

    # table.md: a row per method and length, each task's mean score and their average, in percent
    table = (out / "table.md").read_text()
    assert table.strip() == report_table(stdout)
    assert table.splitlines()[0] == "| method | length | " + " | ".join(ruler.TASKS) + " | average |"
    scores = defaultdict(list)
    for r in records:
        scores[r["method"], r["length"], r["task"]].append(r["score"])
    for line in table.splitlines()[2:]:
        method, length, *cells = [c.strip() for c in line.strip("|").split("|")]
        length = int(length.rstrip("k")) * (1024 if length.endswith("k") else 1)
        means = [sum(v) / len(v) for v in (scores[method, length, t] for t in ruler.TASKS)]
        assert [float(c) for c in cells] == pytest.approx([100 * m for m in means] + [100 * sum(means) / 7], abs=0.05)
    assert len(table.splitlines()) == 2 + 2 * 2

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(records) and [float(row["score"]) for row in rows] == [r["score"] for r in records]
    assert (out / "ruler_niah.png").stat().st_size > 1000
    # the log holds every cell, the identity the run's settings
    logged = [json.loads(line) for line in (out / ruler_suite.LOG_FILE).read_text().splitlines()]
    assert without_timings(logged) == without_timings(records)
    identity = json.loads((out / ruler_suite.RUN_FILE).read_text())
    assert identity["samples"] == 1 and identity["depths"] == [0.2, 0.8] and identity["lengths"] == [1024, 2048]


def report_table(stdout: str) -> str:
    return "\n".join(line for line in stdout.splitlines() if line.startswith("|"))


def test_killed_run_resumed_equals_an_uninterrupted_one(tiny_model_dir, tmp_path, capsys, monkeypatch):
    argv = lambda out, *extra: ruler_argv(tiny_model_dir, out, "--method", "yarn", *extra,
                                          tasks="niah_single,vt,cwe", lengths="1024,2048")
    whole = tmp_path / "whole"
    assert cli.main(argv(whole)) == 0
    expected = records_of(whole)
    assert len(expected) == (2 + 2 + 1) * 2

    real = ruler_suite.greedy_generate
    calls = []

    def killed_after_four(*args, **kwargs):  # the fifth cell's generation is interrupted
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(ruler_suite, "greedy_generate", killed_after_four)
    assert cli.main(argv(out)) == 130
    assert "--resume" in capsys.readouterr().err
    assert len((out / ruler_suite.LOG_FILE).read_text().splitlines()) == 4 and not (out / "results.json").exists()
    with open(out / ruler_suite.LOG_FILE, "a") as log:  # a line torn by the kill
        log.write('{"method": "yarn", "task": "vt", "len')

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    calls.clear()
    monkeypatch.setattr(ruler_suite, "greedy_generate", counted)
    assert cli.main(argv(out, "--resume")) == 0
    assert len(calls) == len(expected) - 4  # the logged cells are taken, not redone
    assert without_timings(records_of(out)) == without_timings(expected)
    assert (out / "table.md").read_text() == (whole / "table.md").read_text()
    # resuming a finished run redoes nothing and gives the same results again
    calls.clear()
    assert cli.main(argv(out, "--resume")) == 0
    assert calls == [] and without_timings(records_of(out)) == without_timings(expected)


@pytest.mark.parametrize("change, key", [
    (["--samples", "2"], "samples"),
    (["--depths", "0.5"], "depths"),
    (["--method", "linear"], "methods"),
    (["--seed", "1"], "seed"),
])
def test_resume_refuses_another_run(tiny_model_dir, tmp_path, capsys, change, key):
    out = tmp_path / "run"
    base = ["--tasks", "niah_single", "--lengths", "1024"]
    assert cli.main(ruler_argv(tiny_model_dir, out, "--method", "yarn", *base)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    argv = ruler_argv(tiny_model_dir, out, "--method", "yarn", *base, *change, "--resume")
    if change[0] == "--method":
        argv = ruler_argv(tiny_model_dir, out, *change, *base, "--resume")
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"different {key}" in err and "--resume" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written
    # without --resume an existing run is refused too; --force replaces it
    assert cli.main(ruler_argv(tiny_model_dir, out, "--method", "yarn", *base, *change)) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main(ruler_argv(tiny_model_dir, out, "--method", "yarn", *base, *change, "--force")) == 0
    assert json.loads((out / ruler_suite.RUN_FILE).read_text()) != json.loads(before[ruler_suite.RUN_FILE])


def test_resume_refuses_a_folder_without_a_run(tiny_model_dir, tmp_path, capsys):
    out = runs.make_dir(tmp_path / "other")
    (out / "results.json").write_text("{}")
    assert cli.main(ruler_argv(tiny_model_dir, out, "--method", "yarn", "--resume", tasks="niah_single")) == 2
    assert "nothing to resume" in capsys.readouterr().err


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_puts_the_prompt_in_the_template(tiny_model_dir, tmp_path, capsys, monkeypatch):
    assert cli.main(ruler_argv(tiny_model_dir, None, "--method", "yarn", "--chat", tasks="niah_single")) == 2
    assert capsys.readouterr().err.strip() == "longrope: error: --chat: the tokenizer has no chat template"

    model = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, model)
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model)
    seen = []
    real = ruler_suite.greedy_generate

    def capture(model_, input_ids, *args, **kwargs):
        seen.append(list(input_ids))
        return real(model_, input_ids, *args, **kwargs)

    monkeypatch.setattr(ruler_suite, "greedy_generate", capture)
    out = tmp_path / "chat"
    assert cli.main(ruler_argv(model, out, "--method", "yarn", "--chat", tasks="niah_single,cwe")) == 0
    assert len(seen) == 3 and json.loads((out / ruler_suite.RUN_FILE).read_text())["chat"] is True
    for ids, record in zip(seen, records_of(out)):
        text = tokenizer.decode(ids)
        assert ids[0] == tokenizer.bos_token_id != ids[1]  # the template's BOS, not one more
        assert text.startswith("<s><|user|>") and len(ids) == record["actual_length"] <= 1024
        prefix = (ruler.NIAH_ANSWER_PREFIX.format(query=re.search(r"numbers for (\S+) mentioned", text).group(1))
                  if record["task"] == "niah_single" else ruler.CWE_ANSWER_PREFIX.format(num_cw=10))
        assert text.endswith("<|end|><|assistant|>" + prefix.lstrip())
    # plain prompts of the same cells are other texts (no template) with the same answers
    plain = evaluate.Prompts(tokenizer, seed=0).sample(ruler_suite.Cell("niah_single", 1024, 0.2, 0))
    assert plain.prompt.startswith(ruler.NIAH_TEMPLATE[:30]) and plain.answers == records_of(out)[0]["answers"]


def test_bundled_model_finds_the_needle_at_its_context(tmp_path, capsys):
    """The bundled byte-level model (trained at 256 with passkey samples) scores on niah_single
    in the passkey wording; RULER's own wording does not fit in its 256 tokens."""
    out = tmp_path / "bundled"
    assert cli.main(["eval", "ruler", "--model", str(BUNDLED), "--lengths", "256", "--tasks", "niah_single",
                     "--wording", "passkey", "--depths", "0.1,0.5,0.9", "--samples", "2", "--max-new-tokens", "8",
                     "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    records = records_of(out)
    assert len(records) == 6 and {r["method"] for r in records} == {"none"}
    assert sum(r["score"] for r in records) / len(records) > 0
    for r in records:
        assert len(r["answers"]) == 1 and re.fullmatch(r"\d{5}", r["answers"][0])
        assert r["score"] == (1.0 if r["answers"][0] in r["output"] else 0.0)
    capsys.readouterr()
    assert cli.main(["eval", "ruler", "--model", str(BUNDLED), "--lengths", "256", "--tasks", "niah_single",
                     "--device", "cpu", "--quiet"]) == 2
    assert "shorter than the prompt without haystack" in capsys.readouterr().err


def test_a_method_must_reach_the_length(tiny_model_dir, tmp_path, capsys):
    info = models.RopeInfo(dim=16, base=10000.0, original_length=ORIGINAL)
    assert models.reach(sc.NoScaling(), info) == ORIGINAL
    assert models.reach(sc.make("yarn", ORIGINAL, 4 * ORIGINAL), info) == 4 * ORIGINAL
    assert models.reach(sc.LinearScaling(factor=2.0), info) == 2 * ORIGINAL
    assert models.reach(sc.make("dynamic", ORIGINAL, 4 * ORIGINAL), info) is None
    # none at 16× the context: refused, unless asked for
    argv = ruler_argv(tiny_model_dir, None, "--compare", "yarn,none", tasks="niah_single")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "no scaling reaches 64 tokens" in err and "--allow-context-mismatch" in err
    assert cli.main(argv + ["--allow-context-mismatch"]) == 0
    # a method configured for a shorter target does not reach the length either
    assert cli.main(ruler_argv(tiny_model_dir, None, "--method", "yarn", "--target-length", "512",
                               tasks="niah_single")) == 2
    assert "the yarn scaling reaches 512 tokens" in capsys.readouterr().err
