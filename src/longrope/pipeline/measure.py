"""The measurement of the final report (report.json; `report.write_extend_report` renders it), and
the sweep behind it that the demo shares: perplexity and passkey at lengths under scalings."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import data, evaluate, models, passkey
from .. import scaling as sc
from .plan import PipelineConfig, default_report_lengths, format_length, silent_bar


def first_tokens(documents: Sequence[data.TokenizedDocument], length: int, device) -> list[torch.Tensor]:
    return [torch.as_tensor(d.tokens[:length], dtype=torch.long, device=device) for d in documents]


@torch.no_grad()
def evaluate_lengths(model, tokenizer, documents: Sequence[data.TokenizedDocument], lengths: Sequence[int],
                     scalings: Callable[[int], Mapping[str, sc.Scaling]], *, n_docs: int, depths: Sequence[float],
                     trials: int, seed: int, documents_seed: int | None = None, device="cpu",
                     chunk_size: int | None = None, new_bar: Callable[[int | None, str, str], Any] = silent_bar,
                     what: str = "evaluate") -> tuple[list[dict], list[dict]]:
    """Perplexity and passkey retrieval of `model` at each length under each scaling of
    `scalings(length)` ({label: scaling}, attached in turn), on the same documents and prompts:

    - one perplexity record per (label, length): the first L tokens of `n_docs` documents
      (`data.select` with `documents_seed`, default `seed`); "ppl" None where none is long enough;
    - one passkey record per (label, length, depth) of `trials` keys (drawn from `seed`, the
      same for every label; none where the prompt alone is longer than L).

    `new_bar(total, description, unit)`: a bar per length (the longest costs the most by far);
    a cell is one perplexity or one passkey trial."""
    ppl_records, passkey_records = [], []
    rng = random.Random(seed)
    documents_seed = seed if documents_seed is None else documents_seed
    kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
    for length in lengths:
        labelled = scalings(length)
        chosen = []
        if any(len(d) >= length for d in documents):
            chosen = data.select(documents, length, n_docs, seed=documents_seed)
        windows = first_tokens(chosen, length, device)
        keys = {depth: [passkey.random_key(rng) for _ in range(trials)] for depth in depths}
        prompts = {depth: [prompt for prompt in (_passkey_prompt(tokenizer, length, depth, key) for key in keys[depth])
                           if prompt is not None] for depth in depths}
        cells = len(labelled) * (1 + sum(len(p) for p in prompts.values()))
        with new_bar(cells, f"{what} {format_length(length)}", "cells") as bar:
            for label, scaling in labelled.items():
                models.attach(model, scaling)
                value = float(evaluate.perplexity(model, windows, **kwargs)) if windows else None
                ppl_records.append({"method": label, "length": length, "ppl": value,
                                    "documents": [d.id for d in chosen], "scaling": scaling.to_dict()})
                bar.update()
                for depth in depths:
                    if not prompts[depth]:
                        continue
                    answers = []
                    for prompt in prompts[depth]:
                        answers.append(evaluate.passkey_trial(model, tokenizer, prompt))
                        bar.update()
                    passkey_records.append({"method": label, "length": length, "depth": depth,
                                            "n_correct": sum(t.correct for t in answers), "n_trials": len(answers),
                                            "accuracy": evaluate.passkey_accuracy(answers),
                                            "answers": [t.answer for t in answers]})
    return ppl_records, passkey_records


def _passkey_prompt(tokenizer, length: int, depth: float, key: str):
    try:
        return passkey.passkey_prompt(tokenizer, length, depth, key)
    except ValueError:  # the prompt alone is longer than `length`
        return None


def measure_report(model_dir: Path, final: sc.LongRoPEScaling, markers: list[dict], *, base_spec: str,
                   info: models.RopeInfo, config: PipelineConfig, documents: Sequence[data.TokenizedDocument],
                   held_apart: bool, new_bar: Callable[[int | None, str, str], Any] = silent_bar) -> dict:
    """What report.json holds: the exported checkpoint (reloaded, so that the export is what is
    measured) at the report lengths, with the base model (`base_spec`) beside it inside the
    original window, on `documents` (`held_apart`: the stages never saw them)."""
    lengths = config.report_lengths or default_report_lengths(info.original_length, config.target_length)
    model, tokenizer = models.load(str(model_dir), dtype=getattr(torch, config.dtype), device=config.device)
    # attached: our float64-angle rotary rather than transformers' own
    ppl, passkey = evaluate_lengths(model, tokenizer, documents, lengths, lambda length: {"extended": final},
                                    n_docs=config.report_docs, depths=config.passkey_depths,
                                    trials=config.passkey_trials, seed=config.seed, documents_seed=config.seed + 1,
                                    device=config.device, chunk_size=config.chunk_size,
                                    new_bar=new_bar, what="report")
    rows = []
    for perplexity in ppl:  # one row per length: perplexity, and passkey over every depth and trial
        at_length = [r for r in passkey if r["length"] == perplexity["length"]]
        n_trials = sum(r["n_trials"] for r in at_length)
        rows.append({"length": perplexity["length"], "ppl": perplexity["ppl"], "documents": perplexity["documents"],
                     "passkey": sum(r["n_correct"] for r in at_length) / n_trials if n_trials else None,
                     "passkey_trials": n_trials})
    # inside the original window, the base model on the same documents: what readjustment must keep
    short_rows = [r for r in rows if r["length"] <= info.original_length and r["ppl"] is not None]
    if short_rows:
        del model
        base, _ = models.load(base_spec, dtype=getattr(torch, config.dtype), device=config.device)
        by_id = {d.id: d for d in documents}
        kwargs = {} if config.chunk_size is None else {"chunk_size": config.chunk_size}
        for r in short_rows:
            windows = first_tokens([by_id[i] for i in r["documents"]], r["length"], config.device)
            r["base_ppl"] = float(evaluate.perplexity(base, windows, **kwargs))
        del base
    return {"model": base_spec, "original_length": info.original_length,
            "target_length": config.target_length, "scaling": final.to_dict(), "results": rows,
            "stages": [{k: m[k] for k in ("stage", "summary", "seconds")} for m in markers],
            "note": ("perplexity: first L tokens of documents drawn from --eval-data, which the stages never "
                     "saw" if held_apart else "perplexity: first L tokens of documents drawn from --data (they may "
                     "include the search documents; give --eval-data to keep them apart)")
                    + "; passkey: standard filler, greedy exact match"}

