"""`longrope export --format gguf` (issue 17): the GGUF file says what was exported (read back with
gguf's own reader), its q/k rows are llama.cpp's layout, bad input is refused in one line; and,
where llama.cpp is installed (`make check-llamacpp`), llama.cpp on the file gives transformers'
log-probabilities beyond the original window, which the same file without the factors does not."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ORIGINAL, tiny_model
from longrope import gguf_export as G
from longrope import models
from longrope import scaling as sc
from longrope.cli import main
from longrope.errors import UsageError
from longrope.testing import save_tiny_model
from longrope.tokenization import byte_tokenizer

gguf = pytest.importorskip("gguf")
TARGET = 4 * ORIGINAL


def scaling_for(model, n_hat: int = 0) -> sc.LongRoPEScaling:
    """Long factors 1..5 and short factors 1..1.3, told apart from each other and from none."""
    info = models.rope_info(model.config)
    half = info.dim // 2
    return sc.LongRoPEScaling(long_factor=tuple(float(x) for x in np.linspace(1.0, 5.0, half)), factor=4.0,
                              short_factor=tuple(float(x) for x in np.linspace(1.0, 1.3, half)),
                              original_max_position_embeddings=ORIGINAL, n_hat=n_hat)


def tensors(path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: np.asarray(t.data) for t in reader.tensors}


@pytest.mark.parametrize("kind", G.GGUF_TYPES)
def test_read_back_equals_what_was_exported(tmp_path, kind):
    model = tiny_model("llama")
    scaling = scaling_for(model)
    path = G.export_gguf(model, byte_tokenizer(), scaling, tmp_path / "g", kind)
    got = G.read_rope(path)
    f32 = lambda xs: tuple(float(np.float32(x)) for x in xs)  # noqa: E731 - the file stores float32
    assert got.freq_factors == f32(scaling.long_factor)
    assert got.attn_factor == pytest.approx(scaling.attention_factor(TARGET + 1), rel=1e-7)
    assert (got.context_length, got.original_context_length) == (TARGET, ORIGINAL)
    assert (got.freq_base, got.rope_dimension) == (10000.0, models.rope_info(model.config).dim)
    assert json.loads((tmp_path / "g" / models.SIDECAR).read_text())["long_factor"] == list(scaling.long_factor)


def test_yarn_goes_out_as_its_factors_and_temperature(tmp_path):
    model = tiny_model("llama")
    info = models.rope_info(model.config)
    yarn = sc.YarnScaling(factor=4.0, original_max_position_embeddings=ORIGINAL)
    got = G.read_rope(G.export_gguf(model, byte_tokenizer(), yarn, tmp_path / "g", "f32"))
    expected = sc.equivalent_factors(yarn, info.dim, info.base, TARGET + 1)
    np.testing.assert_allclose(got.freq_factors, expected.numpy(), rtol=1e-6)
    assert got.attn_factor == pytest.approx(0.1 * np.log(4.0) + 1, rel=1e-6)


def test_weights_are_llama_cpp_s_layout(tmp_path):
    """Every weight is in the file; q and k rows interleaved per head (pair members adjacent), which
    un-interleaved give the Hugging Face matrices back; tied embeddings are not written twice."""
    model = tiny_model("llama")
    path = G.export_gguf(model, byte_tokenizer(), scaling_for(model), tmp_path / "g", "f32")
    t = tensors(path)
    config = model.config
    head_dim = config.head_dim
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    got = t["blk.0.attn_q.weight"].reshape(q.shape)
    undone = got.reshape(config.num_attention_heads, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(q.shape)
    np.testing.assert_array_equal(undone, q)
    assert not np.array_equal(got, q)  # the permutation did something
    # pair member j of head h sits at row h*d + 2j (first half) and h*d + 2j + 1 (second half)
    np.testing.assert_array_equal(got[2 * 3], q[3])
    np.testing.assert_array_equal(got[2 * 3 + 1], q[head_dim // 2 + 3])
    k = model.model.layers[1].self_attn.k_proj.weight.detach().numpy()
    kv_undone = t["blk.1.attn_k.weight"].reshape(k.shape).reshape(config.num_key_value_heads, head_dim // 2, 2, -1)
    np.testing.assert_array_equal(kv_undone.swapaxes(1, 2).reshape(k.shape), k)
    expected = {"token_embd.weight", "output_norm.weight", "rope_freqs.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(config.num_hidden_layers)
        for n in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_norm", "ffn_gate", "ffn_up", "ffn_down",
                  "ffn_norm")}
    if not config.tie_word_embeddings:
        expected.add("output.weight")
    assert set(t) == expected


def test_phi3_goes_out_with_its_long_and_short_factor_tensors(tmp_path):
    model = tiny_model("phi3")
    scaling = scaling_for(model)
    path = G.export_gguf(model, byte_tokenizer(), scaling, tmp_path / "g", "f32")
    got = G.read_rope(path)
    f32 = lambda xs: tuple(float(np.float32(x)) for x in xs)  # noqa: E731
    assert (got.freq_factors, got.short_factors) == (f32(scaling.long_factor), f32(scaling.short_factor))
    assert got.rope_dimension == models.rope_info(model.config).dim == 8  # partial rotary
    t = tensors(path)
    assert "rope_freqs.weight" not in t and "blk.0.attn_qkv.weight" in t
    qkv = model.model.layers[0].self_attn.qkv_proj.weight.detach().numpy()
    np.testing.assert_array_equal(t["blk.0.attn_qkv.weight"].reshape(qkv.shape), qkv)  # not permuted


def test_n_hat_is_refused_or_dropped_and_other_architectures_are_refused(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(UsageError, match="--drop-n-hat"):
        G.export_gguf(model, byte_tokenizer(), scaling_for(model, n_hat=8), tmp_path / "a", "f32")
    assert not (tmp_path / "a").exists()
    G.export_gguf(model, byte_tokenizer(), scaling_for(model, n_hat=8), tmp_path / "b", "f32", drop_n_hat=True)
    with pytest.raises(UsageError, match="Qwen3ForCausalLM is not supported"):
        G.export_gguf(tiny_model("qwen3"), byte_tokenizer(), scaling_for(tiny_model("qwen3")), tmp_path / "c", "f32")
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------------------------
# the command


def export(*argv):
    try:
        return main(["export", *map(str, argv)])
    except SystemExit as exc:  # argparse's refusals
        return exc.code


def test_cli_writes_the_gguf(tiny_model_dir, tmp_path, capsys):
    code = export("--model", tiny_model_dir, "--method", "longrope", "--target-length", TARGET, "--format", "gguf",
                  "--gguf-type", "q8_0", "--out", tmp_path / "g")
    assert code == 0, capsys.readouterr().err
    assert G.read_rope(tmp_path / "g" / G.GGUF_FILE).context_length == TARGET
    assert "wrote" in capsys.readouterr().out


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return save_tiny_model(tiny_model("qwen3"), tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.mark.parametrize("case", ["qwen3", "n_hat", "type"])
def test_cli_bad_input_is_one_line_exit_2_nothing_written(case, tiny_model_dir, qwen3_dir, tmp_path, capsys):
    model, extra, message = {
        "qwen3": (qwen3_dir, ["--method", "longrope", "--target-length", TARGET], "Qwen3ForCausalLM is not supported"),
        "n_hat": (tiny_model_dir, ["--scaling", tmp_path / "s.json"], "--drop-n-hat"),
        "type": (tiny_model_dir, ["--method", "longrope", "--target-length", TARGET, "--gguf-type", "q4_k"],
                 "--gguf-type"),
    }[case]
    (tmp_path / "s.json").write_text(scaling_for(tiny_model("llama"), n_hat=8).to_json())
    code = export("--model", model, *extra, "--format", "gguf", "--out", tmp_path / "g")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "g").exists()


# --------------------------------------------------------------------------------------------
# llama.cpp itself (make check-llamacpp installs it; skipped where it is not installed)


def need_llama_cpp():
    """llama_cpp, or a skip (a failure under `make check-llamacpp`, which must run it)."""
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("LONGROPE_REQUIRE_LLAMACPP"):
            pytest.fail("llama_cpp is not importable: `make check-llamacpp` installs llama-cpp-python")
        pytest.skip("llama-cpp-python is not installed (make check-llamacpp)")
    return llama_cpp


def llama_cpp_logprobs(path, ids: list[int]) -> np.ndarray:
    llama_cpp = need_llama_cpp()
    # the KV cache in float32 (llama.cpp's default is float16): the comparison is at f32 tolerance
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids), logits_all=True, verbose=False, n_threads=2,
                          n_batch=len(ids), n_ubatch=len(ids), type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids)
    logits = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)


@pytest.mark.llamacpp
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3"])
def test_llama_cpp_gives_transformers_log_probabilities_beyond_the_window(tmp_path, arch):
    """Beyond the window, where both apply the long factors (llama.cpp allocating more than the
    original context). phi3's short set is not checked: llama.cpp picks the set by the context it
    allocates, and with a 64-token context it still applied the long one here."""
    need_llama_cpp()
    model = tiny_model(arch)
    scaling = scaling_for(model)
    path = G.export_gguf(model, byte_tokenizer(), scaling, tmp_path / "g", "f32")
    # the reference: plain transformers (its own `longrope` rotary) on our Hugging Face export
    hf = models.export(models.attach(model, scaling), byte_tokenizer(), scaling, tmp_path / "hf")
    reference = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    assert type(reference.model.rotary_emb).__module__.startswith("transformers")
    ids = torch.randint(3, 259, (TARGET,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torch.log_softmax(reference(input_ids=ids[None]).logits[0].double(), -1).numpy()
    ours = llama_cpp_logprobs(path, ids.tolist())
    beyond = slice(ORIGINAL, TARGET)
    np.testing.assert_allclose(ours[beyond], ref[beyond], atol=5e-4)  # measured: 5.3e-5
    # the same file without the factors and the temperature differs there: the check can fail
    plain = G.export_gguf(tiny_model(arch), byte_tokenizer(),
                          dataclasses.replace(scaling, long_factor=(1.0,) * len(scaling.long_factor),
                                              attention_setting=1.0), tmp_path / "plain", "f32")
    assert np.abs(llama_cpp_logprobs(plain, ids.tolist())[beyond] - ref[beyond]).max() > 0.05
