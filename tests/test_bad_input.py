"""Every subcommand against a battery of bad inputs: exit code 2, one line on stderr, no
traceback, nothing written, and the current folder and every input unchanged (hashed before and
after). Then the defects of the reliability issue one by one: --force and the output guard,
Ctrl-C, the umask, the printed max_position_embeddings, the NTK label, the context mismatch."""

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from conftest import ORIGINAL
from longrope import cli, evaluate, models, runs
from longrope import scaling as sc

HALF = 8  # the tiny models' frequency pairs (head_dim 16)
GOOD = {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
        "long_factor": [1.0 + i / 2 for i in range(HALF)]}


def tree_digest(folder: Path) -> dict:
    """Every file and folder below `folder`: path -> content hash (folders: None) and mode."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            found[rel] = (None if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest(),
                          stat.S_IMODE(path.stat().st_mode))
    return found


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def world(tmp_path, tiny_model_dir, monkeypatch):
    """A working folder (the current one) holding a copy of the model, data, scaling files and a
    user's folder; returns the paths."""
    work = tmp_path / "work"
    work.mkdir()
    model = work / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "README.md").write_text("the user's notes")
    text = "\n\n".join(f"Document line {i} about whales and ships." for i in range(400))
    (work / "docs.txt").write_text(text)
    (work / "user").mkdir()
    (work / "user" / "notes.txt").write_text("mine")
    (work / "a-file").write_text("not a folder")
    scalings = {
        "good": GOOD,
        "huge_factor": {**GOOD, "factor": 1e307},
        "string_factors": {**GOOD, "long_factor": "1.0"},
        "huge_lambdas": {**GOOD, "long_factor": [1e308] * HALF},
        "other_context": {**GOOD, "original_max_position_embeddings": 8192},
    }
    for name, data in scalings.items():
        (work / f"{name}.json").write_text(json.dumps(data))
    broken = work / "broken-config"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text("{ not json")
    no_weights = work / "no-weights"
    shutil.copytree(tiny_model_dir, no_weights)
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    (work / "fake.gguf").write_bytes(b"this is not a gguf file")
    monkeypatch.chdir(work)
    return work


EXPORT = ["export", "--model", "model", "--method", "yarn", "--target-length", "256"]
EVAL = ["eval", "ppl", "--model", "model", "--data", "docs.txt", "--lengths", "128", "--docs", "1"]
PASSKEY = ["eval", "passkey", "--model", "model", "--lengths", "128", "--trials", "1"]
RULER = ["eval", "ruler", "--model", "model", "--lengths", "1k", "--tasks", "niah_single", "--method", "yarn"]
SEARCH = ["search", "--model", "model", "--data", "docs.txt", "--target-length", "256", "--out", "s"]
FINETUNE = ["finetune", "--model", "model", "--method", "longrope", "--target-length", "128", "--data", "docs.txt"]
PRETRAIN = ["pretrain", "--data", "docs.txt", "--context", "32", "--steps", "1"]
EXTEND = ["extend", "--model", "model", "--data", "docs.txt", "--target-length", "256"]

CASES = {
    # the output guard: refused with or without --force
    "export --out . --force": EXPORT + ["--out", ".", "--force"],
    "export --out '' --force": EXPORT + ["--out", "", "--force"],
    "export --out .. --force": EXPORT + ["--out", "..", "--force"],
    "export --out MODEL --force": EXPORT + ["--out", "model", "--force"],
    "export --out inside MODEL": EXPORT + ["--out", "model/sub"],
    "export --out holding MODEL": ["export", "--model", "user/../model", "--method", "yarn", "--target-length",
                                   "256", "--out", "..", "--force"],
    "export --out user folder --force": EXPORT + ["--out", "user", "--force"],
    "export --out a file": EXPORT + ["--out", "a-file", "--force"],
    "export --out under a file": EXPORT + ["--out", "a-file/x"],
    "export --out read-only place": EXPORT + ["--out", "/proc/longrope-test/out"],
    "eval --out . --force": EVAL + ["--out", ".", "--force"],
    "eval --out read-only place": EVAL + ["--out", "/proc/longrope-test/out"],
    "eval --out the data file": EVAL + ["--out", "docs.txt", "--force"],
    "search --out .": SEARCH[:-2] + ["--out", "."],
    "search --resume --force": SEARCH + ["--resume", "--force"],
    "finetune --out MODEL --force": FINETUNE + ["--out", "model", "--force"],
    "finetune --resume --force": FINETUNE + ["--out", "ft", "--resume", "--force"],
    "finetune --short-share 1": FINETUNE + ["--out", "ft", "--short-share", "1"],
    "finetune --short-share -0.5": FINETUNE + ["--out", "ft", "--short-share=-0.5"],
    "finetune --distill-weight -1": FINETUNE + ["--out", "ft", "--short-share", "0.2", "--distill-weight=-1"],
    "finetune --distill-weight without --short-share": FINETUNE + ["--out", "ft", "--distill-weight", "1"],
    "finetune --needle-every without --needle-data": FINETUNE + ["--out", "ft", "--needle-every", "2"],
    "finetune --data-weights for other sources": FINETUNE + ["--out", "ft", "--data-weights", "0.5,0.5"],
    "finetune --data-weights negative": FINETUNE + ["--out", "ft", "--data-weights=-1"],
    "pretrain --out .": PRETRAIN + ["--out", "."],
    "extend --out . --force": EXTEND + ["--out", ".", "--force"],
    "demo --out .": ["demo", "--model", "model", "--data", "docs.txt", "--out", "."],
    "demo --out ''": ["demo", "--model", "model", "--data", "docs.txt", "--out", "", "--force"],
    # lengths
    "export --target-length inf": EXPORT[:-2] + ["--target-length", "inf", "--out", "o"],
    "export --target-length 1.5k": EXPORT[:-2] + ["--target-length", "1.5k", "--out", "o"],
    "export --target-length 0": EXPORT[:-2] + ["--target-length", "0", "--out", "o"],
    "export --target-length 1e3": EXPORT[:-2] + ["--target-length", "1e3", "--out", "o"],
    "eval --lengths inf": EVAL[:-4] + ["--lengths", "inf"],
    "eval --lengths 1.5k": EVAL[:-4] + ["--lengths", "1.5k"],
    "eval --lengths 256,,512": EVAL[:-4] + ["--lengths", "256,,512"],
    "eval --lengths ,": EVAL[:-4] + ["--lengths", ","],
    "search --target-length inf": SEARCH[:6] + ["--target-length", "inf", "--out", "s"],
    "extend --target-length 99999999999k": EXTEND[:-1] + ["99999999999k", "--out", "x"],
    # scalings
    "factor 1e307": ["export", "--model", "model", "--scaling", "huge_factor.json", "--out", "o"],
    "long_factor '1.0'": ["export", "--model", "model", "--scaling", "string_factors.json", "--out", "o"],
    "long factors 1e308": ["export", "--model", "model", "--scaling", "huge_lambdas.json", "--out", "o"],
    "another model's context": ["export", "--model", "model", "--scaling", "other_context.json", "--out", "o"],
    "eval another model's context": EVAL + ["--scaling", "other_context.json"],
    "--scaling with --method": ["export", "--model", "model", "--scaling", "good.json", "--method", "linear",
                                "--out", "o"],
    "--scaling with --target-length": ["export", "--model", "model", "--scaling", "good.json",
                                       "--target-length", "1k", "--out", "o"],
    "eval --scaling with --target-length": EVAL + ["--scaling", "good.json", "--target-length", "1k"],
    "unknown method": EXPORT[:3] + ["--method", "wizard", "--target-length", "256", "--out", "o"],
    "eval unknown method": EVAL + ["--method", "wizard"],
    # models
    "broken config.json": ["export", "--model", "broken-config", "--method", "yarn", "--target-length", "256",
                           "--out", "o"],
    "folder without weights": ["export", "--model", "no-weights", "--method", "yarn", "--target-length", "256",
                               "--out", "o"],
    "fake .gguf": ["export", "--model", "fake.gguf", "--method", "yarn", "--target-length", "256", "--out", "o"],
    "eval broken config.json": ["eval", "ppl", "--model", "broken-config", "--data", "docs.txt", "--lengths", "128"],
    "eval folder without weights": ["eval", "ppl", "--model", "no-weights", "--data", "docs.txt",
                                    "--lengths", "128"],
    # devices
    "--device gpu0": EXPORT + ["--out", "o", "--device", "gpu0"],
    "eval --device gpu0": EVAL + ["--device", "gpu0"],
    "search --device tpu": SEARCH + ["--device", "tpu"],
    # other options
    "eval --chunk-size 0": EVAL + ["--chunk-size", "0"],
    "eval --docs 0": EVAL[:-2] + ["--docs", "0"],
    "passkey --depths 2": PASSKEY + ["--depths", "2"],
    "passkey --trials 0": PASSKEY[:-2] + ["--trials", "0"],
    "search --samples 0": SEARCH + ["--samples", "0"],
    "search --keep-angles-seen with critical-dim": SEARCH + ["--keep-angles-seen", "--algorithm", "critical-dim"],
    "ruler unknown task": RULER[:-4] + ["--tasks", "niah_single,wizard"],
    "ruler --depths 1.5": RULER + ["--depths", "0.5,1.5"],
    "ruler --depths -0.1": RULER + ["--depths=-0.1"],
    "ruler --samples 0": RULER + ["--samples", "0"],
    "ruler --max-new-tokens 0": RULER + ["--max-new-tokens", "0"],
    "ruler essay without --data": RULER + ["--haystack", "essay"],
    "ruler --data too short for the essay": RULER[:5] + ["32k"] + RULER[6:] + ["--haystack", "essay", "--data",
                                                                               "docs.txt"],
    "ruler none at 16x the context": RULER[:-2] + ["--method", "none"],
    "ruler default method at 16x the context": RULER[:-2],
    "ruler yarn for a shorter target": RULER + ["--target-length", "256"],
    "ruler template longer than the length": RULER[:5] + ["256"] + RULER[6:],
    "ruler --chat without a chat template": RULER + ["--chat"],
    "ruler --wording passkey with other tasks": RULER[:-4] + ["--wording", "passkey", "--method", "yarn"],
    "ruler --resume without --out": RULER + ["--resume"],
    "ruler --out the model": RULER + ["--out", "model", "--force"],
    "extend bad plan": EXTEND + ["--stages", "wizard:1k", "--out", "x"],
    "unknown subcommand": ["wizard"],
    "unknown option": EXPORT + ["--out", "o", "--wizard"],
}
if not torch.cuda.is_available():
    CASES["--device cuda without CUDA"] = EXPORT + ["--out", "o", "--device", "cuda"]
    CASES["eval --device cuda:0 without CUDA"] = EVAL + ["--device", "cuda:0"]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(world, capsys, name):
    before = tree_digest(world)
    code, _, err = run(capsys, *CASES[name])
    assert code == 2, (name, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, (name, err)
    assert tree_digest(world) == before, name  # nothing written, nothing deleted, no input changed


def test_force_never_deletes_the_current_folder(world, capsys):
    """The data-loss defect: `export --out . --force` deleted every file in the current folder."""
    before = tree_digest(world)
    for out in (".", "", "./", str(world)):
        assert run(capsys, *EXPORT, "--out", out, "--force")[0] == 2
    assert tree_digest(world) == before


def test_force_replaces_longrope_output_atomically_and_keeps_the_umask(world, capsys):
    old_umask = os.umask(0o022)
    try:
        assert run(capsys, *EXPORT, "--out", "exp")[0] == 0
        assert stat.S_IMODE((world / "exp").stat().st_mode) == 0o755  # not mkdtemp's 0700
        (world / "exp" / "stale.txt").write_text("from the old output")
        assert run(capsys, *EXPORT[:-1], "128", "--out", "exp", "--force")[0] == 0
    finally:
        os.umask(old_umask)
    assert not (world / "exp" / "stale.txt").exists()  # the old output went as a whole
    assert json.loads((world / "exp" / "config.json").read_text())["max_position_embeddings"] == 128
    assert not [p for p in world.iterdir() if p.name.startswith(".exp")]  # nothing left aside


def test_replace_dir_keeps_old_output_when_the_new_one_fails(tmp_path):
    out = runs.make_dir(tmp_path / "out")
    (out / "result.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with runs.staged(out, force=True) as tmp:
            (tmp / "result.txt").write_text("half")
            raise RuntimeError("crash while writing")
    assert (out / "result.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_ctrl_c_in_eval_is_one_line_exit_130_and_writes_nothing(world, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate.methods, "nll_windows", interrupted)
    before = tree_digest(world)
    code, _, err = run(capsys, *EVAL, "--out", "results")
    assert code == 130 and len(err.strip().splitlines()) == 1 and "interrupted" in err
    assert tree_digest(world) == before


def test_eval_checks_out_before_any_work(world, capsys, monkeypatch):
    """`eval ppl --out /read-only/x` ran the whole evaluation before failing to write."""
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("loaded the model before checking --out"))
    code, _, err = run(capsys, *EVAL, "--out", "/proc/longrope-test/x")
    assert code == 2 and "cannot write" in err


def test_export_prints_what_it_writes_for_dynamic(world, capsys):
    code, out, _ = run(capsys, "export", "--model", "model", "--method", "dynamic", "--target-length", "256",
                       "--out", "dyn")
    written = json.loads((world / "dyn" / "config.json").read_text())["max_position_embeddings"]
    assert code == 0 and f"max_position_embeddings={written})" in out


def test_ntk_export_evaluates_as_the_model(world, capsys):
    assert run(capsys, *EXPORT[:3], "--method", "ntk", "--target-length", "256", "--out", "ntk")[0] == 0
    code, out, _ = run(capsys, "eval", "ppl", "--model", "ntk", "--data", "docs.txt", "--lengths", "128",
                       "--docs", "1", "--out", "r")
    records = json.loads((world / "r" / "results.json").read_text())["records"]
    assert code == 0 and [r["method"] for r in records] == ["model"]
    # ...and it is NTK: the same perplexity as the base model with --method ntk for that target
    code, _, _ = run(capsys, *EVAL, "--method", "ntk", "--target-length", "256", "--out", "r2")
    theirs = json.loads((world / "r2" / "results.json").read_text())["records"][0]["ppl"]
    assert code == 0 and abs(records[0]["ppl"] - theirs) <= 1e-6 * theirs


def test_eval_method_model_works_as_documented(world, capsys):
    assert run(capsys, *EXPORT, "--out", "yarn-model")[0] == 0
    code, _, err = run(capsys, "eval", "ppl", "--model", "yarn-model", "--data", "docs.txt", "--lengths", "128",
                       "--docs", "1", "--method", "model")
    assert code == 0, err


def test_context_mismatch_needs_the_option(world, capsys):
    argv = ["export", "--model", "model", "--scaling", "other_context.json", "--out", "o"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "--allow-context-mismatch" in err
    assert run(capsys, *argv, "--allow-context-mismatch")[0] == 0


def test_factor_bounds_name_the_field():
    with pytest.raises(sc.ScalingError, match="^long_factor: must be a list of numbers"):
        sc.from_dict({**GOOD, "long_factor": "1.0"})
    with pytest.raises(sc.ScalingError, match="^long_factor: .* above the largest"):
        sc.from_dict({**GOOD, "long_factor": [1e308] * HALF})
    with pytest.raises(sc.ScalingError, match="^factor: .* above the largest"):
        sc.from_dict({**GOOD, "factor": 1e307})
    # the bound leaves every inverse frequency finite and non-zero
    top = sc.from_dict({**GOOD, "long_factor": [sc.MAX_FACTOR] * HALF, "factor": sc.MAX_FACTOR})
    inv = top.inv_freq(2 * HALF, 1e6, seq_len=10**9)
    assert torch.isfinite(inv).all() and (inv > 0).all()


@pytest.mark.parametrize("text", ["inf", "1.5k", "", "-1", "0", "1e3", "64 k", "nan", "3g", f"{2**31 + 1}"])
def test_parse_length_refuses(text):
    with pytest.raises(sc.ScalingError):
        sc.parse_length(text)


def test_parse_length_reads():
    assert [sc.parse_length(t) for t in ("64k", "2m", "2048k", " 8192 ", "1K")] == [65536, 2097152, 2097152,
                                                                                     8192, 1024]


def test_gguf_without_the_extra_is_one_line(world, capsys, monkeypatch):
    """A GGUF model in an install without the gguf extra ('accelerate is required…' before)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    code, _, err = run(capsys, "export", "--model", "fake.gguf", "--method", "yarn", "--target-length", "256",
                       "--out", "o")
    assert code == 2 and err.count("\n") == 1 and "pip install 'longrope[gguf]'" in err and "accelerate" in err


def test_init_without_rope_keys_names_the_field(world, capsys):
    """--init with a JSON lacking the rope keys used to cut the field name off the message."""
    (world / "no-rope.json").write_text(json.dumps({"factor": 4.0}))
    before = tree_digest(world)
    code, _, err = run(capsys, *SEARCH, "--init", "no-rope.json")
    assert code == 2 and "--init no-rope.json: rope_type: missing" in err and err.count("\n") == 1
    assert tree_digest(world) == before
