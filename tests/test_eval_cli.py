"""`longrope eval ppl|passkey` end to end on a tiny saved model, and its bad-input errors."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from conftest import ORIGINAL
from longrope import runs, cli, data, models, report
from longrope import scaling as sc



@pytest.fixture
def docs_file(tmp_path):
    texts = data.read_documents("bundled")
    path = tmp_path / "docs.jsonl"
    # 6 documents of 150..400 bytes, one short one
    lengths = [400, 150, 260, 330, 180, 220, 40]
    path.write_text("".join(json.dumps({"id": f"doc{i}", "text": texts[i].text[:n]}) + "\n"
                            for i, n in enumerate(lengths)))
    return path


def _reference_ppl(model, docs, length):
    nll, count = 0.0, 0
    for tokens in docs:
        ids = torch.as_tensor(tokens[:length])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
        nll -= logp[:-1].gather(1, ids[1:, None]).sum().item()
        count += len(ids) - 1
    return math.exp(nll / count)


def test_eval_ppl_compare(tiny_model_dir, docs_file, tmp_path, capsys):
    scaling_file = tmp_path / "mine.json"
    scaling_file.write_text(sc.make("linear", ORIGINAL, 4 * ORIGINAL).to_json())
    out = tmp_path / "out"
    rc = cli.main(["eval", "ppl", "--model", str(tiny_model_dir), "--data", str(docs_file), "--lengths", "64,128,256",
                   "--docs", "3", "--compare", f"none,linear,ntk,yarn,{scaling_file}", "--out", str(out),
                   "--device", "cpu", "--seed", "5"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "| method | 64 | 128 | 256 |" in stdout and "| yarn |" in stdout and "| mine |" in stdout
    results = json.loads((out / "results.json").read_text())
    assert {"config", "environment", "records", "model"} <= set(results)
    assert results["environment"]["packages"]["torch"] and results["environment"]["device"] == "cpu"
    records = {(r["method"], r["length"]): r for r in results["records"]}
    assert len(records) == 15
    # every method saw the same documents at a length; documents are long enough
    for length in (64, 128, 256):
        ids = {tuple(d["id"] for d in records[m, length]["docs"]) for m in ("none", "linear", "ntk", "yarn", "mine")}
        assert len(ids) == 1
        assert all(d["doc_tokens"] >= length and d["n_tokens"] == length - 1 for d in records["none", length]["docs"])
    # byte-level + BOS: only doc0 (401 tokens), doc2 (261) and doc3 (331) have 256
    assert sorted(d["id"] for d in records["none", 256]["docs"]) == ["doc0", "doc2", "doc3"]
    # at or below the model's context every method is no scaling; above it, configured for the length
    assert {records[m, 64]["ppl"] for m in ("none", "linear", "ntk", "yarn")} == {records["none", 64]["ppl"]}
    assert records["yarn", 128]["scaling"]["factor"] == 2.0 and records["yarn", 256]["scaling"]["factor"] == 4.0
    assert records["mine", 128]["scaling"]["factor"] == 4.0

    # independent reference: transformers' own forward on the same documents with the same scaling
    model, tokenizer = models.load(str(tiny_model_dir))
    tokens = {d.id: d.tokens for d in data.load_tokenized(docs_file, tokenizer)}
    chosen = [tokens[d["id"]] for d in records["yarn", 128]["docs"]]
    models.attach(model, sc.make("yarn", ORIGINAL, 128, dim=16, base=10000.0))
    assert records["yarn", 128]["ppl"] == pytest.approx(_reference_ppl(model, chosen, 128), rel=1e-5)

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 15 and float(rows[0]["ppl"]) == pytest.approx(results["records"][0]["ppl"])
    assert (out / "ppl.png").stat().st_size > 1000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_an_extended_model_is_evaluated_as_it_is_configured(tiny_model_dir, docs_file, tmp_path, capsys):
    """An export carrying a scaling (here with n̂ and a short-regime attention factor, which live in
    longrope.json) is evaluated with that scaling by default ("model"); "none" strips it."""
    model, tokenizer = models.load(str(tiny_model_dir))
    scaling = sc.make("longrope", ORIGINAL, 4 * ORIGINAL, dim=16, base=10000.0, n_hat=4).replace(short_attention_factor=1.0)
    exported = models.export(model, tokenizer, scaling, tmp_path / "extended")
    rc = cli.main(["eval", "ppl", "--model", str(exported), "--data", str(docs_file), "--lengths", "64,256",
                   "--docs", "2", "--compare", "model,none", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 0
    records = {(r["method"], r["length"]): r for r in json.loads((tmp_path / "out" / "results.json").read_text())["records"]}
    assert sc.from_dict(records["model", 256]["scaling"]).to_dict() == scaling.to_dict()
    models.attach(model, scaling)
    chosen = [{d.id: d.tokens for d in data.load_tokenized(docs_file, tokenizer)}[d["id"]]
              for d in records["model", 256]["docs"]]
    assert records["model", 256]["ppl"] == pytest.approx(_reference_ppl(model, chosen, 256), rel=1e-5)
    assert records["none", 256]["ppl"] != pytest.approx(records["model", 256]["ppl"], rel=1e-3)
    capsys.readouterr()
    assert cli.main(["eval", "ppl", "--model", str(exported), "--data", str(docs_file), "--lengths", "64",
                     "--docs", "1", "--device", "cpu"]) == 0
    assert "| model |" in capsys.readouterr().out  # the default for a model that carries a scaling


def test_eval_ppl_sliding_and_stock(tiny_model_dir, docs_file, tmp_path, capsys):
    out = tmp_path / "sliding"
    rc = cli.main(["eval", "ppl", "--model", str(tiny_model_dir), "--data", str(docs_file), "--lengths", "64",
                   "--docs", "2", "--mode", "sliding", "--stride", "16", "--method", "yarn", "--target-length", "256",
                   "--stock", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    records = json.loads((out / "results.json").read_text())["records"]
    lean, stock = records
    assert (lean["impl"], stock["impl"]) == ("lean", "stock")
    assert lean["ppl"] == pytest.approx(stock["ppl"], rel=1e-5)
    assert lean["scaling"]["factor"] == 4.0  # the explicit target fixes the configuration
    for d in lean["docs"]:
        assert d["n_tokens"] == d["doc_tokens"] - 1 and d["n_windows"] > 1
    assert "peak_memory_bytes" in lean
    assert "yarn [stock]" in capsys.readouterr().out


def test_eval_passkey(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pk"
    rc = cli.main(["eval", "passkey", "--model", str(tiny_model_dir), "--lengths", "300,400", "--depths", "0,1",
                   "--trials", "2", "--compare", "none,yarn", "--haystack", "data", "--data", "bundled",
                   "--out", str(out), "--device", "cpu"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "| method | 300 | 400 |" in stdout
    results = json.loads((out / "results.json").read_text())
    records = results["records"]
    assert len(records) == 2 * 2 * 2
    for r in records:
        assert r["n_trials"] == 2 and r["accuracy"] == sum(t["correct"] for t in r["trials"]) / 2
        assert r["length"] - 5 <= r["actual_length_min"] <= r["actual_length_max"] <= r["nominal_length"] == r["length"]
        for t in r["trials"]:
            assert len(t["key"]) == 5 and t["correct"] == (t["answer"].strip()[:5] == t["key"] and
                                                           not t["answer"].strip()[5:6].isdigit())
    # the same keys for every method
    keys = {r["method"]: [t["key"] for t in r["trials"]] for r in records if (r["length"], r["depth"]) == (300, 0.0)}
    assert keys["none"] == keys["yarn"]
    assert (out / "passkey.png").stat().st_size > 1000


def test_report_tables():
    records = [{"method": "none", "length": 1024, "ppl": 3.0}, {"method": "yarn", "length": 2048, "ppl": 2.5},
               {"method": "none", "length": 2048, "ppl": 30.0}]
    assert report.ppl_table(records).splitlines() == [
        "| method | 1k | 2k |", "| --- | ---: | ---: |", "| none | 3.000 | 30.000 |", "| yarn |  | 2.500 |"]
    pk = [{"method": "a", "length": 10, "depth": d, "n_correct": c, "n_trials": 2, "accuracy": c / 2}
          for d, c in ((0.0, 2), (1.0, 1))]
    assert report.passkey_table(pk).splitlines()[-1] == "| a | 75% |"


def test_report_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "_pyplot", lambda: None)
    results = {"command": "ppl", "config": {}, "records": [{"method": "none", "length": 64, "ppl": 2.0, "docs": []}]}
    out = report.write_results(tmp_path / "r", results)
    assert sorted(p.name for p in out.iterdir()) == [runs.MARKER, "results.csv", "results.json", "table.md"]
    assert "matplotlib is not installed" in capsys.readouterr().out
    with pytest.raises(Exception, match="already exists"):
        report.write_results(tmp_path / "r", results)


# --- bad input: exit code 2, one line, no --out left behind ------------------------------------


def _run_error(capsys, argv, out):
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("longrope: error: ")
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))
    return err


def _ppl(model_dir, data_path, out, *extra, lengths="64"):
    return ["eval", "ppl", "--model", str(model_dir), "--data", str(data_path), "--lengths", lengths,
            "--out", str(out), "--device", "cpu", *extra]


def test_error_length_longer_than_every_document(tiny_model_dir, docs_file, tmp_path, capsys):
    out = tmp_path / "o"
    err = _run_error(capsys, _ppl(tiny_model_dir, docs_file, out, lengths="64,1k"), out)
    assert "1024 tokens" in err and "longest (doc0) has 401" in err  # 400 bytes + BOS


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", "no text"),
    ("blank.jsonl", b"\n\n", "no text"),
    ("bad.jsonl.gz", b"not gzip", "not a valid gzip"),
    ("latin.txt", b"caf\xe9 " * 100, "not UTF-8"),
    ("missing.jsonl", None, "no such file"),
    ("notext.jsonl", b'{"text": "fine"}\n{"title": "x"}\n', "line 2 has no \"text\""),
])
def test_error_bad_data(tiny_model_dir, tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "o"
    assert message in _run_error(capsys, _ppl(tiny_model_dir, path, out), out)


@pytest.mark.parametrize("extra, message", [
    (["--compare", "none,bogus"], "bogus"),
    (["--method", "bogus", "--target-length", "128"], "unknown method 'bogus'"),
    (["--method", "yarn", "--target-length", "32"], "target_length"),
])
def test_error_bad_method(tiny_model_dir, docs_file, tmp_path, capsys, extra, message):
    out = tmp_path / "o"
    assert message in _run_error(capsys, _ppl(tiny_model_dir, docs_file, out, *extra), out)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"rope_type": "yarn"}', "factor"),
    ('{"rope_type": "linear", "factor": 0.5}', "factor"),
])
def test_error_malformed_scaling_file(tiny_model_dir, docs_file, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    out = tmp_path / "o"
    for flag in (["--scaling", str(bad)], ["--compare", f"none,{bad}"]):
        assert message in _run_error(capsys, _ppl(tiny_model_dir, docs_file, out, *flag), out)


def test_error_existing_out(tiny_model_dir, docs_file, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert cli.main(_ppl(tiny_model_dir, docs_file, out)) == 2
    assert "--force" in capsys.readouterr().err
    assert cli.main(_ppl(tiny_model_dir, docs_file, out, "--force")) == 0
    assert (out / "results.json").is_file()


def test_error_passkey_length_too_short(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    err = _run_error(capsys, ["eval", "passkey", "--model", str(tiny_model_dir), "--lengths", "100",
                              "--out", str(out), "--device", "cpu"], out)
    assert "100" in err and "passkey prompt" in err
