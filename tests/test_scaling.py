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


def seen_by_scan(scaled_inv_freq: torch.Tensor, original: int, up_to: int) -> int:
    """The last distance n <= up_to at which every pair's angle n·θ'_i is one that pretraining at
    `original` positions showed (angles up to (original-1)·θ_i; every angle for a pair that turned
    fully), found by trying each distance, the frequencies re-derived here."""
    theta = 1.0 / BASE ** (torch.arange(0, DIM, 2, dtype=torch.float64) / DIM)
    turned = (original - 1) * theta >= 2 * math.pi
    n = torch.arange(up_to + 1, dtype=torch.float64)[:, None]
    # transformers' frequencies are float32: a distance exactly at a boundary may round either way
    shown = (turned | (n * scaled_inv_freq <= (original - 1) * theta * (1 + 1e-6))).all(dim=1)
    return int(shown.nonzero().max()) if shown.all() else int((~shown).nonzero().min()) - 1


@pytest.mark.parametrize("name", ["linear", "yarn", "yarn-betas", "llama3", "longrope"])
def test_seen_distance_matches_a_scan_over_distances_on_transformers_frequencies(name):
    params, ours = CASES[name]
    seq_len = ORIGINAL * 8
    ref_inv, _ = hf_reference(params, seq_len)
    seen = sc.seen_distance(ours, DIM, BASE, ORIGINAL, seq_len)
    assert math.floor(seen + 1e-9) == seen_by_scan(ref_inv, ORIGINAL, 64 * ORIGINAL)


def test_seen_distance_by_hand():
    assert sc.seen_distance(sc.NoScaling(), DIM, BASE, ORIGINAL) == ORIGINAL - 1
    assert sc.seen_distance(sc.LinearScaling(factor=4.0), DIM, BASE, ORIGINAL) == pytest.approx(4 * (ORIGINAL - 1))
    # pairs 0-2 turn fully in 63 positions (63·10000^(-2i/16) >= 2π for i <= 2), so the smallest
    # factor among pairs 3-7 bounds it: LONG[3] = 2.0
    assert sc.seen_distance(CASES["longrope"][1], DIM, BASE, ORIGINAL, 4 * ORIGINAL) == pytest.approx(2.0 * 63)
    assert sc.seen_distance(sc.NoScaling(), DIM, BASE, 10 ** 9) == math.inf  # every pair turned


def test_keep_angles_seen_raises_the_unturned_pairs_to_s_and_keeps_the_rest():
    s = 4.0
    scaling = sc.LongRoPEScaling(long_factor=LONG, short_factor=SHORT, factor=s, original_max_position_embeddings=ORIGINAL)
    kept = sc.keep_angles_seen(scaling, DIM, BASE)
    assert kept.long_factor == (1.0, 1.2, 1.5, 4.0, 4.0, 4.0, 4.0, 4.0)  # pairs 3-7 never turned fully
    assert kept.short_factor == scaling.short_factor and kept.factor == s
    assert sc.seen_distance(kept, DIM, BASE, ORIGINAL, 4 * ORIGINAL) == pytest.approx(s * (ORIGINAL - 1))
    assert sc.keep_angles_seen(kept, DIM, BASE) == kept


def test_the_unseen_angles_note_appears_only_when_a_pair_leaves_the_seen_angles():
    from longrope import report
    low = sc.LongRoPEScaling(long_factor=LONG, factor=4.0, original_max_position_embeddings=ORIGINAL)
    note = report.unseen_angles_note(low, DIM, BASE, ORIGINAL, 4 * ORIGINAL)
    assert len(note) == 1 and "beyond a distance of 126 tokens" in note[0]  # 63 · LONG[3]
    for kept in (sc.keep_angles_seen(low, DIM, BASE), sc.make("yarn", ORIGINAL, 4 * ORIGINAL, dim=DIM, base=BASE),
                 sc.LinearScaling(factor=4.0)):
        assert report.unseen_angles_note(kept, DIM, BASE, ORIGINAL, 4 * ORIGINAL) == [], kept


def test_keep_angles_seen_with_a_margin_raises_the_unturned_pairs_to_margin_times_s():
    s, margin = 4.0, 1.25
    scaling = sc.LongRoPEScaling(long_factor=LONG, short_factor=SHORT, factor=s, original_max_position_embeddings=ORIGINAL)
    kept = sc.keep_angles_seen(scaling, DIM, BASE, margin)
    assert kept.long_factor == (1.0, 1.2, 1.5, 5.0, 5.0, 5.0, 5.0, 5.0)  # pairs 3-7 at 1.25 · 4
    # the farthest distance of the target length, 4·64 - 1, now meets at most 1/margin of pair 3's seen angle
    assert sc.seen_distance(kept, DIM, BASE, ORIGINAL, 4 * ORIGINAL) == pytest.approx(5.0 * (ORIGINAL - 1))
    assert sc.keep_angles_seen(scaling, DIM, BASE, 1.0) == sc.keep_angles_seen(scaling, DIM, BASE)
    for bad in (0.9, float("nan")):
        with pytest.raises(sc.ScalingError, match="the margin must be >= 1"):
            sc.keep_angles_seen(scaling, DIM, BASE, bad)


def test_carry_takes_the_factors_to_a_new_scale_as_progressive_extension_does():
    """λ' = λ^(ln s'/ln s), by hand for s = 4 -> s' = 16 (a power of exactly 2), the temperature
    re-derived for s', the rest kept; factors kept at margin·s stay at margin·s' or above."""
    scaling = sc.LongRoPEScaling(long_factor=LONG, short_factor=SHORT, factor=4.0, original_max_position_embeddings=ORIGINAL,
                                 attention_setting=1.3, n_hat=4, short_attention_factor=1.0)
    carried = sc.carry(scaling, 16 * ORIGINAL)
    assert carried.long_factor == pytest.approx([v * v for v in LONG])  # 4 -> 16: squared
    assert carried.factor == 16.0 and carried.target_length == 16 * ORIGINAL
    assert carried.attention_factor(16 * ORIGINAL) == pytest.approx(math.sqrt(1 + math.log(16) / math.log(ORIGINAL)))
    assert (carried.short_factor, carried.n_hat, carried.attention_factor(ORIGINAL)) == (tuple(SHORT), 4, 1.0)
    assert sc.carry(scaling, 4 * ORIGINAL).long_factor == pytest.approx(LONG)  # to its own length: unchanged
    kept = sc.keep_angles_seen(scaling, DIM, BASE, 1.25)
    assert sc.seen_distance(sc.carry(kept, 16 * ORIGINAL), DIM, BASE, ORIGINAL, 16 * ORIGINAL) == \
        pytest.approx(25.0 * (ORIGINAL - 1))  # (1.25·4)² = 25 >= 1.25·16
    with pytest.raises(sc.ScalingError, match="must be above the original context"):
        sc.carry(scaling, ORIGINAL)
    with pytest.raises(sc.ScalingError, match="needs a LongRoPE scaling"):
        sc.carry(sc.LinearScaling(factor=4.0), 16 * ORIGINAL)
