"""RoPE scaling value types: one small frozen dataclass per method, one registry.

A scaling knows how to turn a (rotary dim, rope base) into inverse frequencies, which attention
factor it applies, how to validate itself, and how to round-trip through JSON and a Hugging Face
config. It knows nothing of torch modules or models.

Inverse frequencies are computed in float64: at millions of positions the angle n·θ_i/λ_i needs
more than float32's 24 bits (see `rotary.py`), and rounding θ_i to float32 already costs
2M · 6e-8 ≈ 0.12 rad at position 2M.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from .errors import UsageError


class ScalingError(UsageError):
    """An invalid scaling; the message names the offending field and how to fix it."""


# --------------------------------------------------------------------------------------------
# helpers shared by several methods (pure float64 math)


def rope_inv_freq(dim: int, base: float) -> torch.Tensor:
    """Unscaled inverse frequencies θ_i = base^(-2i/d), i = 0..d/2-1, in float64."""
    exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    return 1.0 / (float(base) ** exponent)


def ntk_base(base: float, factor: float, dim: int) -> float:
    """NTK-aware base b·s^(d/(d−2)) (bloc97): the lowest frequency is stretched by exactly s."""
    return float(base) * float(factor) ** (dim / (dim - 2))


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float,
                          original_length: int, truncate: bool = True) -> tuple[float, float]:
    """Dimension indices where YaRN's ramp starts and ends (the pairs that rotate β times in L)."""

    def dim_for_rotations(rotations: float) -> float:
        return dim * math.log(original_length / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_ramp(dim: int, base: float, original_length: int, beta_fast: float = 32.0,
              beta_slow: float = 1.0, truncate: bool = True) -> torch.Tensor:
    """Per-pair interpolation weight in [0, 1]: 0 = keep the original frequency, 1 = divide by s."""
    low, high = yarn_correction_range(beta_fast, beta_slow, dim, base, original_length, truncate)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = (torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)
    return ramp.clamp(0.0, 1.0)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# The largest scale and rescale factor accepted. 2^20 takes a 2k-context model to 2G tokens, far
# past anything that can be evaluated; larger values are typos, and at ~1e308 the inverse
# frequencies underflow to zero (every position would get the same angle).
MAX_FACTOR = float(2**20)


def _check_factor(factor: Any) -> float:
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not math.isfinite(factor):
        raise ScalingError(f"factor: must be a finite number, got {factor!r}")
    if factor <= 1:
        raise ScalingError(f"factor: must be > 1 (target length above the original context), got {factor}; "
                           "use method 'none' for no scaling")
    if factor > MAX_FACTOR:
        raise ScalingError(f"factor: {factor:g} is above the largest supported scale {MAX_FACTOR:g} (2^20); "
                           "check the value (target length / original context)")
    return float(factor)


def _check_length(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ScalingError(f"{name}: must be a positive integer, got {value!r}")
    return value


# The longest sequence a length may name: 2^31 tokens (positions stay int32-safe in kernels).
MAX_LENGTH = 2**31


def parse_length(text: str) -> int:
    """'65536', '64k', '2m', '2048k' -> tokens (k = 1024, m = 1024²): a whole number of tokens
    or of k/m, nothing else ('1.5k', 'inf', '' are refused, naming the text)."""
    t = str(text).strip().lower()
    match = re.fullmatch(r"(\d+)([km]?)", t)
    if match is None:
        raise ScalingError(f"not a length: {text!r}; write a whole number of tokens, e.g. 65536 or 64k")
    value = int(match.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2)]
    if not 1 <= value <= MAX_LENGTH:
        raise ScalingError(f"not a length: {text!r} (a length is 1 to {MAX_LENGTH} = 2^31 tokens)")
    return value


# --------------------------------------------------------------------------------------------
# the value types


@dataclass(frozen=True)
class Scaling:
    """Base of every scaling. Subclasses set `rope_type` and override `_scaled_inv_freq`."""

    rope_type: ClassVar[str] = ""
    rope_theta: float | None = field(default=None, kw_only=True)  # None: take the model's base

    # -- behaviour -------------------------------------------------------------------------
    def inv_freq(self, dim: int, base: float, seq_len: int | None = None) -> torch.Tensor:
        """float64 inverse frequencies (d/2,) for sequences of `seq_len` tokens (used by dynamic
        methods and by LongRoPE's short/long choice)."""
        return self._scaled_inv_freq(dim, float(self.rope_theta or base), seq_len)

    def _scaled_inv_freq(self, dim: int, base: float, seq_len: int | None) -> torch.Tensor:
        return rope_inv_freq(dim, base)

    def attention_factor(self, seq_len: int | None = None) -> float:
        """Multiplier applied to cos and sin (so attention logits scale by its square)."""
        return 1.0

    # Does the regime (`regime`) depend on the sequence length? A class fact, for rotary modules
    # that are not ours (transformers' own, which carry only a rope_type).
    length_dependent: ClassVar[bool] = False

    def regime(self, seq_len: int | None):
        """THE decision of which frequencies a sequence of `seq_len` tokens uses, as a hashable
        key: two lengths get the same inverse frequencies and attention factor exactly when they
        get the same key. None: one regime for every length. Every module that caches per-regime
        values or must notice a switch (rotary, lean, generation, context parallelism) asks this."""
        return None

    @property
    def n_hat(self) -> int:
        """Leading positions that keep the original frequencies (LongRoPE only)."""
        return 0

    @property
    def target_length(self) -> int | None:
        factor = getattr(self, "factor", None)
        original = getattr(self, "original_max_position_embeddings", None)
        return None if factor is None or original is None else int(round(factor * original))

    def validate(self, dim: int | None = None) -> "Scaling":
        """Raise ScalingError naming the field at fault; `dim` is the model's rotary dimension."""
        if self.rope_theta is not None and not (isinstance(self.rope_theta, (int, float))
                                                and math.isfinite(self.rope_theta) and self.rope_theta > 1):
            raise ScalingError(f"rope_theta: must be a finite number > 1, got {self.rope_theta!r}")
        self._validate(dim)
        return self

    def _validate(self, dim: int | None) -> None:
        pass

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """transformers' rope-parameters form (plus our keys only where it has none)."""
        out: dict[str, Any] = {"rope_type": self.rope_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def replace(self, **changes: Any) -> "Scaling":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class NoScaling(Scaling):
    rope_type: ClassVar[str] = "default"


@dataclass(frozen=True)
class LinearScaling(Scaling):
    """Position interpolation (Chen et al. 2023): every frequency divided by s."""

    rope_type: ClassVar[str] = "linear"
    factor: float
    original_max_position_embeddings: int | None = None

    def _scaled_inv_freq(self, dim, base, seq_len):
        return rope_inv_freq(dim, base) / self.factor

    def _validate(self, dim):
        _check_factor(self.factor)


@dataclass(frozen=True)
class NTKScaling(Scaling):
    """Fixed NTK-aware scaling: the base becomes b·s^(d/(d−2))."""

    rope_type: ClassVar[str] = "ntk"
    factor: float
    original_max_position_embeddings: int | None = None

    def _scaled_inv_freq(self, dim, base, seq_len):
        return rope_inv_freq(dim, ntk_base(base, self.factor, dim))

    def _validate(self, dim):
        _check_factor(self.factor)


@dataclass(frozen=True)
class DynamicNTKScaling(Scaling):
    """Dynamic NTK: the NTK base grows with the current length beyond the original context."""

    rope_type: ClassVar[str] = "dynamic"
    factor: float
    original_max_position_embeddings: int

    length_dependent: ClassVar[bool] = True

    def regime(self, seq_len):
        """The effective length: the base grows with every length past the original context."""
        return max(seq_len or self.original_max_position_embeddings, self.original_max_position_embeddings)

    def _scaled_inv_freq(self, dim, base, seq_len):
        original = self.original_max_position_embeddings
        seq_len = self.regime(seq_len)
        grown = (self.factor * seq_len / original) - (self.factor - 1)
        return rope_inv_freq(dim, base * grown ** (dim / (dim - 2)))

    def _validate(self, dim):
        _check_factor(self.factor)
        _check_length("original_max_position_embeddings", self.original_max_position_embeddings)


@dataclass(frozen=True)
class YarnScaling(Scaling):
    """YaRN (Peng et al. 2023): NTK-by-parts ramp between β_fast and β_slow, plus 0.1·ln s + 1."""

    rope_type: ClassVar[str] = "yarn"
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_setting: float | None = None  # serialised as "attention_factor"
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def _scaled_inv_freq(self, dim, base, seq_len):
        ramp = yarn_ramp(dim, base, self.original_max_position_embeddings, self.beta_fast,
                         self.beta_slow, self.truncate)
        theta = rope_inv_freq(dim, base)
        return theta / self.factor * ramp + theta * (1 - ramp)

    def attention_factor(self, seq_len=None):
        if self.attention_setting is not None:
            return float(self.attention_setting)
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    def _validate(self, dim):
        _check_factor(self.factor)
        _check_length("original_max_position_embeddings", self.original_max_position_embeddings)
        if not self.beta_fast > self.beta_slow > 0:
            raise ScalingError(f"beta_fast/beta_slow: need beta_fast > beta_slow > 0, "
                               f"got {self.beta_fast}/{self.beta_slow}")

    def to_dict(self):
        out = super().to_dict()
        if "attention_setting" in out:
            out["attention_factor"] = out.pop("attention_setting")
        return out


@dataclass(frozen=True)
class Llama3Scaling(Scaling):
    """Llama 3.1: low frequencies divided by s, high kept, a smooth blend in between."""

    rope_type: ClassVar[str] = "llama3"
    factor: float
    original_max_position_embeddings: int
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def _scaled_inv_freq(self, dim, base, seq_len):
        theta = rope_inv_freq(dim, base)
        original = self.original_max_position_embeddings
        wavelen = 2 * math.pi / theta
        low_freq_wavelen = original / self.low_freq_factor
        high_freq_wavelen = original / self.high_freq_factor
        scaled = torch.where(wavelen > low_freq_wavelen, theta / self.factor, theta)
        smooth = (original / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(medium, blended, scaled)

    def _validate(self, dim):
        _check_factor(self.factor)
        _check_length("original_max_position_embeddings", self.original_max_position_embeddings)
        if not self.high_freq_factor > self.low_freq_factor > 0:
            raise ScalingError("low_freq_factor/high_freq_factor: need high_freq_factor > low_freq_factor > 0")


def longrope_attention_factor(kind: str | float, factor: float, original_length: int) -> float:
    """"su" = sqrt(1 + ln s / ln L) (LongRoPE, Phi-3), "yarn" = 0.1·ln s + 1, or a number."""
    if isinstance(kind, (int, float)) and not isinstance(kind, bool):
        return float(kind)
    if kind == "su":
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original_length))
    if kind == "yarn":
        return yarn_mscale(factor)
    raise ScalingError(f"attention_factor: must be 'su', 'yarn' or a number, got {kind!r}")


@dataclass(frozen=True)
class LongRoPEScaling(Scaling):
    """LongRoPE (Ding et al. 2024): a searched rescale factor λ_i per frequency pair.

    Positions < n_hat keep the original frequencies and no attention factor; the rest use
    `long_factor` when the sequence exceeds the original context, `short_factor` otherwise
    (chosen, as transformers does, from the largest position in the batch).

    `short_attention_factor` (None: the same as the long one, transformers' longrope) is the
    attention factor of the short regime: the temperature sqrt(1 + ln s / ln L) corrects long
    inputs and sharpens short ones, so the short-context readjustment sets it to 1. It exports as
    `short_mscale` / `long_mscale`, the keys vLLM's longrope and transformers' PhiMoE read.
    """

    rope_type: ClassVar[str] = "longrope"
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    factor: float
    short_factor: tuple[float, ...] | None = None  # None: all 1.0
    # the attention factor as given: a number, or "su" (sqrt(1 + ln s / ln L)); `attention_factor()`
    # resolves it; serialised as transformers' "attention_factor"
    attention_setting: float | str = "su"
    n_hat: int = 0
    short_attention_factor: float | None = None  # None: attention_factor in both regimes

    def __post_init__(self):
        # lists from JSON become tuples so the value stays hashable and immutable
        for name in ("long_factor", "short_factor"):
            value = getattr(self, name)
            if value is None:
                continue
            if hasattr(value, "tolist"):  # a tensor or numpy array
                value = value.tolist()
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
                raise ScalingError(f"{name}: must be a list of numbers, one per frequency pair, got "
                                   f"{str(value)[:60]!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))

    @classmethod
    def from_target(cls, long_factor, original_length: int, target_length: int, **kw) -> "LongRoPEScaling":
        return cls(long_factor=long_factor, original_max_position_embeddings=original_length,
                   factor=target_length / original_length, **kw)

    length_dependent: ClassVar[bool] = True

    def regime(self, seq_len):
        """"long" past the original context (long factors, the long attention factor), else
        "short" (also for an unknown length)."""
        return "long" if seq_len and seq_len > self.original_max_position_embeddings else "short"

    def is_long(self, seq_len: int | None) -> bool:
        return self.regime(seq_len) == "long"

    def factors(self, seq_len: int | None) -> tuple[float, ...]:
        if self.is_long(seq_len):
            return self.long_factor
        return self.short_factor or (1.0,) * len(self.long_factor)

    def _scaled_inv_freq(self, dim, base, seq_len):
        lam = torch.tensor(self.factors(seq_len), dtype=torch.float64)
        return rope_inv_freq(dim, base) / lam

    def attention_factor(self, seq_len=None):
        """The long regime's factor; the short one's for a `seq_len` inside the original context."""
        if self.short_attention_factor is not None and seq_len and not self.is_long(seq_len):
            return float(self.short_attention_factor)
        return longrope_attention_factor(self.attention_setting, self.factor,
                                         self.original_max_position_embeddings)

    def _validate(self, dim):
        _check_factor(self.factor)
        original = _check_length("original_max_position_embeddings", self.original_max_position_embeddings)
        for name in ("long_factor", "short_factor"):
            values = getattr(self, name)
            if values is None:
                continue
            if dim is not None and len(values) != dim // 2:
                raise ScalingError(f"{name}: has {len(values)} values but the model's rotary dimension {dim} "
                                   f"needs {dim // 2} (one per frequency pair)")
            if not all(math.isfinite(v) for v in values):
                raise ScalingError(f"{name}: contains a non-finite value (nan or inf)")
            if max(values) > MAX_FACTOR:
                raise ScalingError(f"{name}: {max(values):g} is above the largest supported rescale factor "
                                   f"{MAX_FACTOR:g} (2^20); check the values")
            if name == "long_factor" and min(values) < 1:
                raise ScalingError(f"long_factor: every rescale factor must be >= 1, got min {min(values)}")
            if name == "short_factor" and min(values) <= 0:
                raise ScalingError(f"short_factor: every rescale factor must be > 0, got min {min(values)}")
        if self.short_factor is not None and len(self.short_factor) != len(self.long_factor):
            raise ScalingError("short_factor: must have as many values as long_factor")
        if not isinstance(self.n_hat, int) or isinstance(self.n_hat, bool) or not 0 <= self.n_hat < original:
            raise ScalingError(f"n_hat: must be an integer in [0, original_max_position_embeddings={original}), "
                               f"got {self.n_hat!r}")
        a = self.attention_factor()
        if not (math.isfinite(a) and a > 0):
            raise ScalingError(f"attention_factor: must be a positive finite number, got {a}")
        short = self.short_attention_factor
        if short is not None and (isinstance(short, bool) or not isinstance(short, (int, float))
                                  or not math.isfinite(short) or short <= 0):
            raise ScalingError(f"short_attention_factor: must be a positive finite number, got {short!r}")

    def to_dict(self):
        out = super().to_dict()
        # write the resolved number so the object is valid transformers rope parameters as it stands
        out.pop("attention_setting", None)
        out["attention_factor"] = self.attention_factor()
        out["short_factor"] = list(self.factors(None))
        if not self.n_hat:
            out.pop("n_hat", None)
        return out


SCALINGS: dict[str, type[Scaling]] = {
    cls.rope_type: cls
    for cls in (NoScaling, LinearScaling, NTKScaling, DynamicNTKScaling, YarnScaling, Llama3Scaling, LongRoPEScaling)
}
# names users type on the command line, and legacy config spellings, mapped to registry keys
ALIASES = {"none": "default", "pi": "linear", "su": "longrope", "ntk-aware": "ntk"}
METHODS = ("none", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope")


def length_dependent(rope_type: str) -> bool:
    """Does a rope type's regime depend on the sequence length? (transformers' own names too:
    its "dynamic" variants and "longrope"; unknown types: no)."""
    key = ALIASES.get(str(rope_type).lower(), str(rope_type).lower())
    if "dynamic" in key:  # transformers' "dynamic" and the legacy "*_dynamic" spellings
        key = "dynamic"
    return key in SCALINGS and SCALINGS[key].length_dependent


def canonical_type(name: str) -> str:
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in SCALINGS:
        raise ScalingError(f"rope_type: unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return key


# --------------------------------------------------------------------------------------------
# construction

PRESETS = Path(__file__).parent / "presets"  # searched scalings shipped with the package


def from_dict(data: dict[str, Any], dim: int | None = None) -> Scaling:
    """Build and validate a scaling from transformers' rope-parameters form (v5 or legacy v4 keys)."""
    if not isinstance(data, dict):
        raise ScalingError(f"scaling: expected a JSON object, got {type(data).__name__}")
    data = dict(data)
    name = data.pop("rope_type", None) or data.pop("type", None)
    data.pop("type", None)
    if name is None:
        raise ScalingError("rope_type: missing; add e.g. \"rope_type\": \"longrope\"")
    cls = SCALINGS[canonical_type(name)]
    for hf_key, ours in (("attention_factor", "attention_setting"),):
        if hf_key in data and "attention_setting" in {f.name for f in dataclasses.fields(cls)}:
            data[ours] = data.pop(hf_key)
    if cls is LongRoPEScaling and ("short_mscale" in data or "long_mscale" in data):
        # per-regime factors as vLLM and transformers' PhiMoE write them; long_mscale rules the long regime
        short, long = data.pop("short_mscale", None), data.pop("long_mscale", None)
        if long is not None:
            data["attention_setting"] = long
        if short is not None and short != long:
            data.setdefault("short_attention_factor", short)
    if cls is LongRoPEScaling and "factor" not in data and "max_position_embeddings" in data:
        data["factor"] = data["max_position_embeddings"] / data["original_max_position_embeddings"]
    known = {f.name for f in dataclasses.fields(cls)}
    # keys transformers writes that carry no information for us
    ignored = {"max_position_embeddings", "partial_rotary_factor", "attention_factor"}
    unknown = set(data) - known - ignored
    if unknown:
        raise ScalingError(f"{sorted(unknown)[0]}: unknown key for rope_type {cls.rope_type!r}; "
                           f"allowed: {', '.join(sorted(known))}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ScalingError(f"{missing[0]}: missing for rope_type {cls.rope_type!r}")
    kwargs = {k: v for k, v in data.items() if k in known}
    try:
        scaling = cls(**kwargs)
    except ScalingError:
        raise  # names its field already
    except (TypeError, ValueError) as exc:
        raise ScalingError(f"scaling: {exc}") from None
    return scaling.validate(dim)


def preset_path(spec: str) -> Path:
    """A scaling file, or the file of a preset shipped with the package."""
    preset = PRESETS / f"{spec}.json"
    path = preset if not Path(spec).exists() and preset.is_file() else Path(spec)
    if not path.is_file():
        raise ScalingError(f"--scaling {spec}: no such file or preset (presets: "
                           f"{', '.join(p.stem for p in sorted(PRESETS.glob('*.json'))) or 'none'})")
    return path


def from_json(text: str, dim: int | None = None) -> Scaling:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScalingError(f"scaling file: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return from_dict(data, dim)


def load(path, dim: int | None = None) -> Scaling:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ScalingError(f"scaling file: cannot read {path}: {exc.strerror}") from None
    return from_json(text, dim)


def make(method: str, original_length: int, target_length: int | None = None, *, dim: int | None = None,
         base: float | None = None, **options: Any) -> Scaling:
    """A scaling of `method` that extends `original_length` to `target_length` tokens.

    For `longrope`, the factors default to YaRN's ramp (the usual starting individual of the
    search) with the "su" attention factor; pass `long_factor=` to choose them.
    """
    key = canonical_type(method)
    if key == "default":
        return NoScaling()
    if target_length is None:
        raise ScalingError(f"target_length: required for method {method!r}")
    if not isinstance(target_length, int) or target_length <= original_length:
        raise ScalingError(f"target_length: must be greater than the model's context {original_length}, "
                           f"got {target_length}")
    factor = target_length / original_length
    if key == "longrope":
        if "long_factor" not in options:
            if dim is None or base is None:
                raise ScalingError("long_factor: needed (or give dim and base to start from YaRN's factors)")
            options["long_factor"] = yarn_factors(dim, base, original_length, factor).tolist()
        return LongRoPEScaling(original_max_position_embeddings=original_length, factor=factor,
                               **options).validate(dim)
    return from_dict({"rope_type": key, "factor": factor, "original_max_position_embeddings": original_length,
                      **options}, dim)


def equivalent_factors(scaling: Scaling, dim: int, base: float, seq_len: int | None = None) -> torch.Tensor:
    """Per-pair rescale factors λ_i = θ_i / θ'_i that reproduce `scaling` as a LongRoPE factor vector."""
    return rope_inv_freq(dim, base) / scaling.inv_freq(dim, base, seq_len)


def unturned_pairs(dim: int, base: float, original_length: int) -> torch.Tensor:
    """(d/2,) bool: the frequency pairs that never turn fully within `original_length` positions
    ((L-1)·θ_i < 2π, the pairs past LongRoPE2's critical dimension): pretraining showed them only
    part of their angles."""
    return (original_length - 1) * rope_inv_freq(dim, base) < 2 * math.pi


def seen_distance(scaling: Scaling, dim: int, base: float, original_length: int,
                  seq_len: int | None = None) -> float:
    """The longest relative distance at which every frequency pair of `scaling` still rotates by
    an angle that pretraining at `original_length` showed the model. Pretraining saw pair i at
    distances 0..L-1, angles up to (L-1)·θ_i: a pair with that short of a full turn (the pairs
    past LongRoPE2's critical dimension) meets a new angle beyond (L-1)·λ_i under λ_i. The
    minimum of those over the pairs (inf when every pair turned fully), in float64: a model
    can read nothing further back with those pairs without having learned their new angles,
    however the rest of the factors suit perplexity."""
    partial = unturned_pairs(dim, base, original_length)
    if not bool(partial.any()):
        return math.inf
    lam = equivalent_factors(scaling, dim, base, seq_len)
    return float(((original_length - 1) * lam[partial]).min())


def keep_angles_seen(scaling: "LongRoPEScaling", dim: int, base: float, margin: float = 1.0) -> "LongRoPEScaling":
    """`scaling` with each long factor of a pair that never turned fully in pretraining raised to
    at least margin · s (s the extension factor), so that `seen_distance` reaches (L-1)·s·margin:
    past the critical dimension the factors are at least s, as LongRoPE2's search requires. A
    margin above 1 keeps the target length's farthest distances off the angles pretraining showed
    least (its longest distances); Phi-3.5-mini's published long factors (s = 32) end at 64.8,
    about 2·s. The rest is kept (a non-decreasing vector stays non-decreasing)."""
    if not (math.isfinite(margin) and margin >= 1):
        raise ScalingError(f"keep_angles_seen: the margin must be >= 1, got {margin}")
    partial = unturned_pairs(dim, base, scaling.original_max_position_embeddings).tolist()
    floor = margin * scaling.factor
    factors = [max(f, floor) if p else f for f, p in zip(scaling.long_factor, partial)]
    return scaling.replace(long_factor=tuple(factors)).validate(dim)


def rescale_factors(long_factor: Sequence[float], factor: float, new_factor: float) -> tuple[float, ...]:
    """Carry factors made for scale s to scale s' > 1: λ' = λ^(ln s' / ln s), which keeps
    λ = 1 (unscaled high frequencies) at 1, maps λ = s to s', and keeps the vector's order."""
    if factor <= 1 or new_factor <= 1:
        raise ValueError(f"rescale_factors: scales must be > 1, got {factor} and {new_factor}")
    power = math.log(new_factor) / math.log(factor)
    return tuple(float(max(1.0, v) ** power) for v in long_factor)


def carry(scaling: "LongRoPEScaling", target_length: int) -> "LongRoPEScaling":
    """`scaling` carried to `target_length` as progressive extension carries a stage's factors to
    the next (LongRoPE §3.3; the seed of `search:L`): long factors λ^(ln s'/ln s) and the
    temperature sqrt(1 + ln s'/ln L) for the new scale s'; n̂, the short factors and the short
    regime's attention factor kept. A factor that was raised to keep the angles seen at s
    (`keep_angles_seen`, λ >= margin·s) stays >= margin·s' (the power is > 1 when s' > s), so
    the carried scaling keeps them at the new length too."""
    if not isinstance(scaling, LongRoPEScaling):
        raise ScalingError(f"carry: needs a LongRoPE scaling, got {scaling.rope_type}")
    original = scaling.original_max_position_embeddings
    if target_length <= original:
        raise ScalingError(f"carry: the target length {target_length} must be above the original context {original}")
    new_factor = target_length / original
    return scaling.replace(long_factor=rescale_factors(scaling.long_factor, scaling.factor, new_factor),
                           factor=new_factor, attention_setting="su")


def pi_factors(dim: int, base: float, factor: float) -> torch.Tensor:
    return equivalent_factors(LinearScaling(factor=factor), dim, base)


def ntk_factors(dim: int, base: float, factor: float) -> torch.Tensor:
    return equivalent_factors(NTKScaling(factor=factor), dim, base)


def yarn_factors(dim: int, base: float, original_length: int, factor: float) -> torch.Tensor:
    return equivalent_factors(YarnScaling(factor=factor, original_max_position_embeddings=original_length),
                              dim, base)
