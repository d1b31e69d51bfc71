"""The export command: real runs and every kind of bad input (exit code 2, one line, nothing written)."""

import json
import math
import subprocess
import sys

import pytest
from transformers import AutoConfig

from longrope.cli import main, parse_length
from conftest import ORIGINAL

GOOD = {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
        "long_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_with_method(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "yarn"
    code, stdout, _ = run(capsys, "export", "--model", tiny_model_dir, "--method", "yarn", "--target-length", 256,
                          "--out", out, "--device", "cpu")
    assert code == 0 and "wrote" in stdout
    config = AutoConfig.from_pretrained(out)
    assert config.rope_parameters["rope_type"] == "yarn" and config.max_position_embeddings == 256
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()


def test_export_with_scaling_file_and_n_hat_note(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({**GOOD, "n_hat": 4}))
    code, stdout, _ = run(capsys, "export", "--model", tiny_model_dir, "--scaling", path, "--out", tmp_path / "o",
                          "--device", "cpu")
    assert code == 0 and "n_hat=4: transformers' config cannot express this" in stdout


def test_export_carry_to_takes_the_model_s_own_factors_to_a_new_length(tiny_model_dir, tmp_path, capsys):
    """A model exported with LongRoPE factors for 4·L, exported again with --carry-to 16·L: the
    factors squared (λ^(ln 16/ln 4)), the temperature of the new scale, the context 16·L; the same
    from --scaling on the base model. A model without LongRoPE factors is refused in one line."""
    path = tmp_path / "s.json"
    path.write_text(json.dumps(GOOD))
    first = tmp_path / "first"
    assert run(capsys, "export", "--model", tiny_model_dir, "--scaling", path, "--out", first, "--device", "cpu")[0] == 0
    for argv in (["--model", first], ["--model", tiny_model_dir, "--scaling", path]):
        out = tmp_path / "carried"
        code, stdout, err = run(capsys, "export", *argv, "--carry-to", 16 * ORIGINAL, "--out", out, "--device", "cpu",
                                "--force")
        assert code == 0, err
        config = AutoConfig.from_pretrained(out)
        rope = config.rope_parameters
        assert rope["long_factor"] == pytest.approx([v * v for v in GOOD["long_factor"]]) and rope["factor"] == 16
        assert rope["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(16) / math.log(ORIGINAL)))
        assert config.max_position_embeddings == 16 * ORIGINAL
    plain = tmp_path / "plain"
    code, _, err = run(capsys, "export", "--model", tiny_model_dir, "--carry-to", 16 * ORIGINAL, "--out", plain)
    assert code == 2 and err.count("\n") == 1 and "--carry-to: the model" in err and "no LongRoPE factors" in err
    code, _, err = run(capsys, "export", "--model", first, "--carry-to", ORIGINAL, "--out", plain)
    assert code == 2 and f"--carry-to {ORIGINAL}: the target length" in err and not plain.exists()


BAD_SCALINGS = [
    ({**GOOD, "long_factor": GOOD["long_factor"][:5]}, "long_factor"),
    ({**GOOD, "long_factor": [math.nan] + GOOD["long_factor"][1:]}, "long_factor"),
    ({**GOOD, "long_factor": [0.5] + GOOD["long_factor"][1:]}, "long_factor"),
    ({**GOOD, "n_hat": -2}, "n_hat"),
    ({**GOOD, "n_hat": ORIGINAL}, "n_hat"),
    ({**GOOD, "factor": 1.0}, "factor"),
    ({**GOOD, "rope_type": "wizard"}, "rope_type"),
]


@pytest.mark.parametrize("data,field", BAD_SCALINGS)
def test_bad_scaling_file(tiny_model_dir, tmp_path, capsys, data, field):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "out"
    code, _, err = run(capsys, "export", "--model", tiny_model_dir, "--scaling", path, "--out", out,
                       "--device", "cpu")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"longrope: error: {field}")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["s.json"]


@pytest.mark.parametrize("argv,needle", [
    (["--method", "yarn", "--target-length", ORIGINAL], "target_length"),
    (["--method", "yarn", "--target-length", ORIGINAL // 2], "target_length"),
    (["--scaling", "no-such-file.json"], "--scaling"),
    (["--method", "yarn"], "target_length"),
    ([], "--scaling"),
])
def test_bad_arguments(tiny_model_dir, tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    code, _, err = run(capsys, "export", "--model", tiny_model_dir, *argv, "--out", out, "--device", "cpu")
    assert code == 2 and err.count("\n") == 1 and needle in err
    assert not out.exists()


def test_malformed_json_and_unknown_model(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text("{not json")
    code, _, err = run(capsys, "export", "--model", tiny_model_dir, "--scaling", path, "--out", tmp_path / "o")
    assert code == 2 and "not valid JSON" in err
    code, _, err = run(capsys, "export", "--model", tmp_path / "nowhere", "--method", "linear", "--target-length",
                       128, "--out", tmp_path / "o")
    assert code == 2 and err.startswith("longrope: error: model:") and err.count("\n") == 1


def test_existing_output_needs_force_and_force_spares_user_folders(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    for extra in ([], ["--force"]):  # a folder longrope did not write is refused, --force or not
        code, _, err = run(capsys, "export", "--model", tiny_model_dir, "--method", "linear", "--target-length",
                           128, "--out", out, "--device", "cpu", *extra)
        assert code == 2 and "longrope did not write it" in err and (out / "keep.txt").read_text() == "user data"
    ours = tmp_path / "ours"
    assert run(capsys, "export", "--model", tiny_model_dir, "--method", "linear", "--target-length", 128,
               "--out", ours, "--device", "cpu")[0] == 0
    code, _, err = run(capsys, "export", "--model", tiny_model_dir, "--method", "yarn", "--target-length", 128,
                       "--out", ours, "--device", "cpu")
    assert code == 2 and "--force" in err
    assert run(capsys, "export", "--model", tiny_model_dir, "--method", "yarn", "--target-length", 128,
               "--out", ours, "--device", "cpu", "--force")[0] == 0
    assert json.loads((ours / "config.json").read_text())["rope_scaling"]["type"] == "yarn"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left aside


def test_model_directory_is_never_modified(tiny_model_dir, tmp_path, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()}
    run(capsys, "export", "--model", tiny_model_dir, "--method", "ntk", "--target-length", 128, "--out",
        tmp_path / "o", "--device", "cpu")
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()} == before


def test_console_script_exit_code(tiny_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "longrope", "export", "--model", str(tiny_model_dir), "--method",
                           "yarn", "--target-length", "32", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "target_length" in proc.stderr


def test_parse_length():
    assert parse_length("64k") == 65536 and parse_length("2m") == 2097152 and parse_length("8192") == 8192
