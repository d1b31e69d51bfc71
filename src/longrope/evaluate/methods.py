"""Several scalings measured side by side: which scaling each method uses at each length, and the
perplexity and passkey grids that `longrope eval` prints (one record per cell, every raw number)."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import data, models, passkey
from .. import scaling as sc
from ..errors import UsageError
from .generation import passkey_trial
from .perplexity import document_windows, nll_windows, peak_memory, perplexity_from

Tick = Callable[[], None]  # called once per measured cell (progress)


@dataclass(frozen=True)
class MethodSpec:
    label: str
    method: str | None = None  # a method name, configured per length
    scaling: sc.Scaling | None = None  # or a fixed scaling (from a file, or the model's own)


def scaling_label(spec: str) -> str:
    """A table label for a scaling file: its name, or its folder's for a search's scaling.json."""
    path = Path(spec)
    return path.parent.name if path.stem == "scaling" and path.parent.name else path.stem


def _is_method(name: str) -> bool:
    try:
        sc.canonical_type(name)
        return True
    except sc.ScalingError:
        return False


def method_entries(compare: str | None, scaling: str | None, method: str | None, target_length: int | None,
                   default: str) -> list[str]:
    """What `longrope eval` compares, from its options (`--compare A,B`, `--scaling S` or `--method M`;
    else `default`), checked before any model is loaded."""
    if sum(map(bool, (compare, scaling, method))) > 1:
        raise UsageError("give only one of --compare, --scaling and --method")
    if compare is not None and not [e for e in compare.split(",") if e.strip()]:
        raise UsageError("--compare: give a comma-separated list, e.g. none,linear,ntk,yarn")
    if scaling and target_length is not None:
        raise UsageError("--target-length configures methods; a --scaling file is used as it is: drop one")
    if scaling:
        sc.preset_path(scaling)  # a file or preset, nothing else
    if method and method.lower() != "model":
        sc.canonical_type(method)  # an unknown method is refused here, with the list of known ones
    return [e.strip() for e in compare.split(",") if e.strip()] if compare else [scaling or method or default]


def method_specs(entries: Sequence[str], model_spec: str, info: models.RopeInfo,
                 allow_context_mismatch: bool = False) -> list[MethodSpec]:
    """One spec per entry: a method name, `model` (the scaling the model carries), or a scaling
    file / preset (checked against the model now). Repeated labels get -2, -3 ..."""
    specs, labels = [], set()
    for entry in entries:
        if entry.lower() == "model":
            spec = MethodSpec("model", scaling=models.configured_scaling(model_spec))
        elif _is_method(entry):
            spec = MethodSpec(entry.lower(), method=entry)
        elif Path(entry).exists() or (sc.PRESETS / f"{entry}.json").is_file():
            scaling = sc.load(sc.preset_path(entry), info.dim)
            models.check_fits(scaling, info, allow_context_mismatch)
            spec = MethodSpec(scaling_label(entry), scaling=scaling)
        else:
            raise UsageError(f"method {entry!r}: not a known method ({', '.join(sc.METHODS)}) "
                             "nor an existing scaling file")
        name = spec.label
        for i in range(2, 100):
            if name not in labels:
                break
            name = f"{spec.label}-{i}"
        labels.add(name)
        specs.append(MethodSpec(name, spec.method, spec.scaling))
    return specs


def scaling_at(spec: MethodSpec, length: int, info: models.RopeInfo, target_length: int | None) -> sc.Scaling:
    """The scaling `spec` uses when evaluated at `length` tokens: a fixed scaling as it is; a
    method configured for `target_length`, else for `length` above the model's context, else none."""
    if spec.scaling is not None:
        return spec.scaling
    target = target_length or (length if length > info.original_length else None)
    if target is None or sc.canonical_type(spec.method) == "default":
        return sc.NoScaling()
    return sc.make(spec.method, info.original_length, target, dim=info.dim, base=info.base)


def perplexity_records(model, info: models.RopeInfo, chosen: Mapping[int, Sequence], specs: Sequence[MethodSpec], *,
                       target_length: int | None = None, mode: str = "truncate", stride: int | None = None,
                       max_tokens: int | None = None, chunk_size: int | None = None, stock: bool = False,
                       allow_context_mismatch: bool = False, device=None, tick: Tick = lambda: None) -> list[dict]:
    """Token-weighted perplexity of the documents `chosen[length]` at each length under each
    method (and, with `stock`, transformers' own forward too): one record per (length, method,
    forward), per-document NLL sums inside. `tick()` after each document."""
    records = []
    for length, documents in chosen.items():
        for spec in specs:
            scaling = scaling_at(spec, length, info, target_length)
            models.attach(model, scaling, allow_context_mismatch)
            for impl in ["lean", "stock"] if stock else ["lean"]:
                per_doc, started = [], time.perf_counter()
                with peak_memory(device) as peak:
                    for doc in documents:
                        spans = data.windows(len(doc), length, mode, stride or length, max_tokens)
                        s, c = nll_windows(model, document_windows(doc.tokens, spans), chunk_size=chunk_size,
                                           stock=impl == "stock")
                        per_doc.append({"id": doc.id, "doc_tokens": len(doc), "n_windows": len(spans),
                                        "nll_sum": s, "n_tokens": c})
                        tick()
                total, count = sum(d["nll_sum"] for d in per_doc), sum(d["n_tokens"] for d in per_doc)
                records.append({"method": spec.label, "impl": impl, "length": length, "mode": mode,
                                "stride": (stride or length) if mode == "sliding" else None,
                                "ppl": perplexity_from(total, count), "nll_sum": total, "n_tokens": count,
                                "n_docs": len(per_doc), "peak_memory_bytes": peak.bytes,
                                "seconds": time.perf_counter() - started, "scaling": scaling.to_dict(),
                                "docs": per_doc})
    return records


def _trial_rng(seed: int, length: int, depth: float, trial: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{length}:{depth}:{trial}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def passkey_prompts(tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int,
                    texts: Sequence | None = None, tick: Tick = lambda: None) -> dict:
    """{(length, depth, trial): prompt}, the same for every method: a key and (with `texts`, real
    text as the haystack) a haystack draw per cell, seeded by the cell."""
    prompts = {}
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                rng = _trial_rng(seed, length, depth, trial)
                key = passkey.random_key(rng)
                haystack = (data.haystack_text(texts, 8 * length + 2048, seed=rng.randrange(1 << 30))
                            if texts is not None else None)
                try:
                    prompts[length, depth, trial] = passkey.passkey_prompt(tokenizer, length, depth, key, haystack)
                except ValueError as exc:
                    raise UsageError(f"--lengths {length}: {exc}") from None
                tick()
    return prompts


def passkey_records(model, tokenizer, info: models.RopeInfo, prompts: Mapping, specs: Sequence[MethodSpec], *,
                    haystack: str = "filler", target_length: int | None = None, max_new_tokens: int = 10,
                    allow_context_mismatch: bool = False, device=None, tick: Tick = lambda: None) -> list[dict]:
    """Greedy passkey accuracy of each method at each (length, depth) over the prompts' trials:
    one record per cell, every answer inside. `tick()` after each trial."""
    lengths = sorted({length for length, _, _ in prompts})
    depths = sorted({depth for _, depth, _ in prompts})
    n_trials = 1 + max(trial for _, _, trial in prompts)
    records = []
    for length in lengths:
        for spec in specs:
            scaling = scaling_at(spec, length, info, target_length)
            models.attach(model, scaling, allow_context_mismatch)
            for depth in depths:
                trials, started = [], time.perf_counter()
                with peak_memory(device) as peak:
                    for trial in range(n_trials):
                        trials.append(passkey_trial(model, tokenizer, prompts[length, depth, trial],
                                                    max_new_tokens=max_new_tokens))
                        tick()
                rows = [{"key": t.key, "answer": t.answer, "correct": t.correct,
                         "actual_length": t.actual_length} for t in trials]
                n_correct = sum(r["correct"] for r in rows)
                actual = [r["actual_length"] for r in rows]
                records.append({"method": spec.label, "length": length, "depth": depth, "haystack": haystack,
                                "accuracy": n_correct / len(rows), "n_correct": n_correct, "n_trials": len(rows),
                                "nominal_length": length, "actual_length_min": min(actual),
                                "actual_length_max": max(actual), "peak_memory_bytes": peak.bytes,
                                "seconds": time.perf_counter() - started, "scaling": scaling.to_dict(),
                                "trials": rows})
    return records
