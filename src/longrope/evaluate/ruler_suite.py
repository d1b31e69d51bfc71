"""The RULER tasks (`ruler`) run on a model under several scalings, as `longrope eval ruler` runs
them: the cells of a run (task, length, depth, sample), a seed per cell, greedy generation scored
as RULER scores it, one record per (method, cell), and the run's folder, which logs each record as
it is made so that a killed run continues where it stopped (`open_run`)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import models, runs
from ..errors import UsageError
from . import ruler
from .generation import greedy_generate
from .methods import MethodSpec, scaling_at
from .perplexity import peak_memory

# RULER's tokens_to_generate per task family (its synthetic.yaml)
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}
DEPTHLESS_TASKS = ("cwe", "fwe")  # no needle: one set of samples per length, whatever --depths says
RUN_FILE = "run.json"  # the run's identity, which --resume must match
LOG_FILE = "cells.jsonl"  # one record per finished (method, cell), appended as each finishes


def family(task: str) -> str:
    return task.split("_")[0]


@dataclass(frozen=True)
class Cell:
    task: str
    length: int
    depth: float | None  # None for the tasks without a needle (DEPTHLESS_TASKS)
    sample: int  # which sample of this (task, length, depth), from 0


def ruler_cells(tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float], samples: int) -> list[Cell]:
    """Every cell of a run, length by length (shortest first), then task, depth and sample."""
    return [Cell(task, length, depth, i) for length in lengths for task in tasks
            for depth in ([None] if task in DEPTHLESS_TASKS else depths) for i in range(samples)]


def record_key(method: str, task: str, length: int, depth: float | None, sample: int) -> tuple:
    return method, task, length, depth, sample


def cell_key(method: str, cell: Cell) -> tuple:
    return record_key(method, cell.task, cell.length, cell.depth, cell.sample)


@dataclass(frozen=True, eq=False)
class Prompts:
    """How a run's samples are made: each cell's sample from a seed of its own, drawn from the
    run's seed and the cell (so a resumed run remakes the same ones), the same for every method."""

    tokenizer: object
    seed: int
    haystack: str = "filler"  # niah tasks: filler, essay or noise
    essay: str | None = None  # the text of an essay haystack
    wording: str = "ruler"  # niah_single: ruler or passkey
    chat: bool = False

    def seed_of(self, cell: Cell) -> int:
        digest = hashlib.sha256(f"{self.seed}:{cell.task}:{cell.length}:{cell.depth}:{cell.sample}".encode())
        return int.from_bytes(digest.digest()[:4], "little")

    def sample(self, cell: Cell) -> ruler.RulerSample:
        options = {"chat": self.chat}
        if family(cell.task) == "niah":
            options.update(haystack=self.haystack, essay=self.essay)
            if self.wording != "ruler":  # only niah_single takes another wording (checked by the caller)
                options["wording"] = self.wording
        return ruler.make_sample(cell.task, self.tokenizer, cell.length, cell.depth, self.seed_of(cell), **options)


def first_samples(prompts: Prompts, cells: Sequence[Cell], tick: Callable[[], None] = lambda: None) -> dict:
    """{cell: sample} for the first cell of each (task, length): made before any work, so that a
    length too short for a task's template, or an essay too short for a length, is refused
    before anything is written (the other samples of a (task, length) differ only in their
    draws). The run uses them as they are."""
    firsts, seen = {}, set()
    for cell in cells:
        if (cell.task, cell.length) in seen:
            continue
        seen.add((cell.task, cell.length))
        try:
            firsts[cell] = prompts.sample(cell)
        except ValueError as exc:
            raise UsageError(f"--lengths {cell.length}, {cell.task}: {exc}") from None
        tick()
    return firsts


def ruler_records(model, tokenizer, info: models.RopeInfo, specs: Sequence[MethodSpec], cells: Sequence[Cell],
                  prompts: Prompts, *, made: Mapping[Cell, ruler.RulerSample] | None = None,
                  done: Mapping[tuple, dict] | None = None, target_length: int | None = None,
                  max_new_tokens: int | None = None, allow_context_mismatch: bool = False, device=None,
                  on_record: Callable[[dict], None] = lambda record: None,
                  tick: Callable[[], None] = lambda: None) -> list[dict]:
    """One record per (method, cell), in cell order: the greedy output after the sample's prompt
    (at most `max_new_tokens` tokens, default RULER's for the task) and its RULER score. Records
    in `done` (by `cell_key`: a resumed run's) are taken as they are; each new one is passed to
    `on_record` (the run's log) and counted by `tick()`. `made`: samples already made
    (`first_samples`). A cell's sample is made once, for all the methods that need it."""
    made, done = made or {}, done or {}
    records = []
    for cell in cells:
        sample = None
        for spec in specs:
            key = cell_key(spec.label, cell)
            if key in done:
                records.append(done[key])
                continue
            if sample is None:
                sample = made.get(cell) or prompts.sample(cell)
            scaling = scaling_at(spec, cell.length, info, target_length)
            if models.attached_scaling(model) != scaling:
                models.attach(model, scaling, allow_context_mismatch)
            budget = max_new_tokens or MAX_NEW_TOKENS[family(cell.task)]
            started = time.perf_counter()
            with peak_memory(device) as peak:
                new = greedy_generate(model, sample.input_ids, budget, eos_token_id=tokenizer.eos_token_id)
            output = tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            record = {"method": spec.label, "task": cell.task, "length": cell.length, "depth": cell.depth,
                      "sample": cell.sample, "seed": sample.seed,
                      "score": ruler.score(cell.task, output, sample.answers), "output": output,
                      "answers": list(sample.answers), "actual_length": sample.actual_length, "new_tokens": len(new),
                      "peak_memory_bytes": peak.bytes, "seconds": time.perf_counter() - started}
            on_record(record)
            records.append(record)
            tick()
    return records


# --------------------------------------------------------------------------------------------
# the run's folder: its identity and the log of finished cells


def open_run(out, identity: dict, *, resume: bool = False, force: bool = False,
             command: str = "eval ruler") -> dict[tuple, dict]:
    """Make --out the folder of a run whose identity (model, tasks, lengths, methods ...) is
    `identity` (`runs.open_dir`: --force replaces only longrope's folder) and return the records
    a resumed run takes from its log, by `record_key`. With `resume`, a folder holding another
    run's cells, or no identity, is refused before anything is written; a line torn by a kill
    is dropped."""
    out = Path(out)
    saved, log = out / RUN_FILE, out / LOG_FILE
    if resume and out.is_dir() and any(p.name != runs.MARKER for p in out.iterdir()):
        if not saved.is_file():
            raise UsageError(f"--resume {out}: no {RUN_FILE} there, so nothing to resume; choose another folder "
                             "or pass --force")
        theirs = json.loads(saved.read_text())
        diff = runs.differences(theirs, identity)
        if diff:
            raise UsageError(f"--resume {out}: that run was made with a different {diff[0]} "
                             f"({str(theirs.get(diff[0]))[:80]!r}); use the same settings, another --out, or --force")
    runs.open_dir(out, force=force, resume=resume, command=command)
    runs.write_text(saved, json.dumps(identity, indent=2) + "\n")
    done = read_log(log) if resume else {}
    # rewritten whole, so the next record is not appended to a torn line
    runs.write_text(log, "".join(json.dumps(r) + "\n" for r in done.values()))
    return done


def read_log(path: Path) -> dict[tuple, dict]:
    """The records of a log, by `record_key`; a line that does not parse (torn by a kill) is skipped."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                done[record_key(r["method"], r["task"], r["length"], r["depth"], r["sample"])] = r
            except (ValueError, KeyError, TypeError):
                continue
    return done


class CellLog:
    """Appends each record to the log in `out` (opened by `open_run`; None: no log) as one JSON
    line, flushed at once: what a killed run leaves for --resume."""

    def __init__(self, out):
        self.file = open(Path(out) / LOG_FILE, "a", encoding="utf-8") if out is not None else None

    def __call__(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def __enter__(self) -> "CellLog":
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()
