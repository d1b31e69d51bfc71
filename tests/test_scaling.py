"""Scalings against transformers' own RoPE functions and hand-derived values."""

import json
import math

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from longrope import scaling as sc
from conftest import ORIGINAL, tiny_config

DIM, BASE = 16, 10000.0
LONG = [1.0, 1.2, 1.5, 2.0, 2.7, 3.3, 3.9, 4.0]
SHORT = [1.0, 1.0, 1.05, 1.1, 1.1, 1.2, 1.2, 1.3]

CASES = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, sc.LinearScaling(factor=4.0)),
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0},
                sc.DynamicNTKScaling(factor=4.0, original_max_position_embeddings=ORIGINAL)),
    "yarn": ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL},
             sc.YarnScaling(factor=8.0, original_max_position_embeddings=ORIGINAL)),
    "yarn-betas": ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL,
                    "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.3},
                   sc.YarnScaling(factor=8.0, original_max_position_embeddings=ORIGINAL, beta_fast=16.0,
                                  beta_slow=2.0, attention_setting=1.3)),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": ORIGINAL,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0},
               sc.Llama3Scaling(factor=8.0, original_max_position_embeddings=ORIGINAL)),
    "longrope": ({"rope_type": "longrope", "long_factor": LONG, "short_factor": SHORT, "factor": 4.0,
                  "original_max_position_embeddings": ORIGINAL},
                 sc.LongRoPEScaling(long_factor=LONG, short_factor=SHORT, factor=4.0,
                                    original_max_position_embeddings=ORIGINAL)),
}


def hf_reference(params: dict, seq_len: int | None):
    config = tiny_config("llama", {"rope_theta": BASE, **params}, max_position_embeddings=ORIGINAL)
    inv_freq, attention = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu", seq_len=seq_len)
    return inv_freq.double(), attention


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("seq_len", [ORIGINAL // 2, ORIGINAL * 3])
def test_inv_freq_and_attention_factor_match_transformers(name, seq_len):
    params, ours = CASES[name]
    ref_inv, ref_attention = hf_reference(params, seq_len)
    got = ours.inv_freq(DIM, BASE, seq_len)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref_inv, rtol=1e-6, atol=0)
    assert ours.attention_factor(seq_len) == pytest.approx(ref_attention, rel=1e-12)


def test_ntk_stretches_lowest_frequency_by_exactly_s():
    s = 8.0
    theta = sc.rope_inv_freq(DIM, BASE)
    ntk = sc.NTKScaling(factor=s).inv_freq(DIM, BASE)
    assert ntk[0] == theta[0]  # highest frequency untouched
    assert (theta[-1] / ntk[-1]).item() == pytest.approx(s, rel=1e-12)
    assert sc.ntk_base(BASE, s, DIM) == pytest.approx(BASE * s ** (16 / 14), rel=1e-15)


def test_equivalent_factors_by_hand():
    assert torch.allclose(sc.pi_factors(DIM, BASE, 4.0), torch.full((8,), 4.0, dtype=torch.float64))
    yarn = sc.yarn_factors(DIM, BASE, ORIGINAL, 8.0)
    # pairs that turn more than beta_fast=32 times in 64 tokens keep their frequency; none here do
    # at dim 16: the correction range is computed by hand from YaRN's formula
    low, high = sc.yarn_correction_range(32, 1, DIM, BASE, ORIGINAL)
    expected_low = math.floor(DIM * math.log(ORIGINAL / (32 * 2 * math.pi)) / (2 * math.log(BASE)))
    assert low == max(expected_low, 0)
    assert yarn[-1].item() == pytest.approx(8.0)
    assert torch.all(yarn[1:] >= yarn[:-1])


def test_longrope_uses_short_inside_and_long_beyond_original():
    s = CASES["longrope"][1]
    theta = sc.rope_inv_freq(DIM, BASE)
    torch.testing.assert_close(s.inv_freq(DIM, BASE, ORIGINAL), theta / torch.tensor(SHORT, dtype=torch.float64))
    torch.testing.assert_close(s.inv_freq(DIM, BASE, ORIGINAL + 1), theta / torch.tensor(LONG, dtype=torch.float64))
    assert s.attention_factor() == pytest.approx(math.sqrt(1 + math.log(4) / math.log(ORIGINAL)))
    yarnish = s.replace(attention_setting="yarn")
    assert yarnish.attention_factor() == pytest.approx(0.1 * math.log(4) + 1)
    assert s.replace(attention_setting=1.25).attention_factor() == 1.25


@pytest.mark.parametrize("name", CASES)
def test_json_round_trip(name):
    _, ours = CASES[name]
    back = sc.from_json(ours.to_json(), DIM)
    assert back.to_dict() == ours.to_dict()
    torch.testing.assert_close(back.inv_freq(DIM, BASE, 1000), ours.inv_freq(DIM, BASE, 1000))


def test_longrope_json_is_transformers_form_with_n_hat():
    s = sc.make("longrope", ORIGINAL, 4 * ORIGINAL, dim=DIM, base=BASE, n_hat=4)
    data = json.loads(s.to_json())
    assert data["rope_type"] == "longrope" and data["n_hat"] == 4
    assert data["short_factor"] == [1.0] * 8 and len(data["long_factor"]) == 8
    assert isinstance(data["attention_factor"], float) and data["factor"] == 4.0
    assert sc.from_dict(data).n_hat == 4


def test_legacy_su_spelling():
    s = sc.from_dict({"type": "su", "long_factor": LONG, "short_factor": SHORT,
                      "original_max_position_embeddings": 64, "max_position_embeddings": 256})
    assert isinstance(s, sc.LongRoPEScaling) and s.factor == 4.0 and s.target_length == 256


BAD = [
    ({"long_factor": LONG[:-1]}, "long_factor"),
    ({"long_factor": LONG[:-1] + [float("nan")]}, "long_factor"),
    ({"long_factor": [0.9] + LONG[1:]}, "long_factor"),
    ({"short_factor": SHORT[:3]}, "short_factor"),
    ({"n_hat": -1}, "n_hat"),
    ({"n_hat": ORIGINAL}, "n_hat"),
    ({"factor": 1.0}, "factor"),
    ({"factor": 0.5}, "factor"),
    ({"attention_factor": "bogus"}, "attention_factor"),
    ({"rope_type": "magic"}, "rope_type"),
    ({"bogus_key": 1}, "bogus_key"),
]


@pytest.mark.parametrize("change,field", BAD)
def test_validation_names_the_field(change, field):
    data = dict(CASES["longrope"][0])
    data.update(change)
    with pytest.raises(sc.ScalingError) as info:
        sc.from_dict(data, DIM)
    message = str(info.value)
    assert message.startswith(field) and "\n" not in message


def test_make_refuses_target_not_above_original():
    with pytest.raises(sc.ScalingError, match="^target_length"):
        sc.make("yarn", ORIGINAL, ORIGINAL)
    with pytest.raises(sc.ScalingError, match="^rope_type"):
        sc.make("magic", ORIGINAL, 2 * ORIGINAL)
