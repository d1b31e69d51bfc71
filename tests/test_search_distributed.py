"""The search over several processes (gloo on the CPU): same result as one process.

Two ranks are started with torch.multiprocessing (file:// rendezvous) for the engine, and with
`torchrun --nproc-per-node 2 -m longrope search` for the command line on the tiny model.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longrope import distributed, runs
from longrope import search as S
from test_search import SMALL, SPACE, TARGET, TARGET_N_HAT, quadratic_fitness, strip_seconds
from test_search_longrope2 import CRIT_ATT, attention_fitness, critical_target

WORLD = 2


def crit_fitness():
    return attention_fitness(CRIT_ATT, 1.2, critical_target(CRIT_ATT, 4, [330, 400, 500, 520]).factor_steps)


# every search is (name, space, fitness factory, config, resume)
SEARCHES = [
    ("plain", SPACE, lambda: quadratic_fitness(SPACE, TARGET, TARGET_N_HAT), dict(generations=6, seed=1), False),
    ("critical", CRIT_ATT, crit_fitness, dict(generations=9, max_evals=41, seed=2), False),
    ("resumed", SPACE, lambda: quadratic_fitness(SPACE, TARGET, TARGET_N_HAT), dict(generations=2, seed=3), False),
    ("resumed", SPACE, lambda: quadratic_fitness(SPACE, TARGET, TARGET_N_HAT), dict(generations=5, seed=3), True),
]


def counting(fitness, counts):
    def wrapped(scaling):
        counts.append(1)
        return fitness(scaling)

    return wrapped


def _rank_main(rank: int, init_file: str, work: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        work = Path(work)
        report = {"evaluated": {}}
        for i, (name, space, make_fitness, cfg, resume) in enumerate(SEARCHES):
            counts: list = []
            result = S.run_distributed(space, counting(make_fitness(), counts),
                                       S.SearchConfig(**cfg, **SMALL), work / name, resume=resume)
            report["evaluated"][i] = len(counts)
            if rank == 0:
                report[i] = (result.best, result.fitness, strip_seconds(result.stats))
            else:
                assert result is None

        # a fitness that fails on the other rank: rank 0 raises, nobody is left waiting
        def failing(scaling):
            if rank == 1 and scaling.long_factor[0] > 1.5:
                raise ValueError("boom")
            return 1.0

        try:
            S.run_distributed(SPACE, failing, S.SearchConfig(generations=2, **SMALL), None)
        except RuntimeError as exc:
            report["error"] = str(exc)
        (work / f"rank{rank}.pkl").write_bytes(pickle.dumps(report))
    finally:
        dist.destroy_process_group()
    distributed.exit_without_teardown(0)  # reached after success only: see its docstring


@pytest.mark.torchrun
def test_two_ranks_give_the_one_process_result(tmp_path):
    import torch.multiprocessing as mp

    work = tmp_path / "ranks"
    work.mkdir()
    mp.spawn(_rank_main, args=(str(tmp_path / "rendezvous"), str(work)), nprocs=WORLD, join=True)
    ranks = [pickle.loads((work / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]

    evals_before = 0
    for i, (name, space, make_fitness, cfg, resume) in enumerate(SEARCHES):
        single = S.run(space, make_fitness(), S.SearchConfig(**cfg, **SMALL), tmp_path / "one" / name, resume=resume)
        best, fitness, stats = ranks[0][i]
        assert (best, fitness) == (single.best, single.fitness), name
        assert stats == strip_seconds(single.stats), name
        if i == max(j for j, search in enumerate(SEARCHES) if search[0] == name):  # the folder's last search
            history = S.read_history(work / name)
            assert strip_seconds(history) == strip_seconds(S.read_history(tmp_path / "one" / name))
            assert json.loads((work / name / S.SUMMARY).read_text())["evals"] == single.summary["evals"]
        # both ranks did part of the work, and every candidate was evaluated once
        done = [r["evaluated"][i] for r in ranks]
        assert all(d > 0 for d in done) and sum(done) == single.summary["evals"] - evals_before
        evals_before = single.summary["evals"] if name == "resumed" else 0
    assert ranks[0][1][0].critical_pairs is not None and ranks[0][1][0].attention_steps is not None
    assert json.loads((work / "critical" / S.SUMMARY).read_text())["evals"] == 41
    assert "rank 1: ValueError: boom" in ranks[0]["error"]
    assert "error" not in ranks[1]  # the other rank was released, not left waiting
    assert sorted(p.name for p in (work / "plain").iterdir()) == sorted([runs.MARKER, S.STATE, S.HISTORY, S.SCALING, S.SUMMARY])


def test_evaluator_refuses_outside_a_process_group():
    with pytest.raises(RuntimeError, match="only on rank 0"):
        S.DistributedEvaluator(quadratic_fitness())
    assert S.init_distributed() is None  # no WORLD_SIZE: one process
    result = S.run_distributed(SPACE, quadratic_fitness(), S.SearchConfig(generations=1, **SMALL))
    assert result.summary["evals"] > 12


# --------------------------------------------------------------------------------------------
# the command line under torchrun


def torchrun() -> list[str] | None:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.is_file() else ([shutil.which("torchrun")] if shutil.which("torchrun") else None)


CLI = ["--target-length", "256", "--samples", "1", "--population", "6", "--mutations", "2", "--crossovers", "2",
       "--parents", "3", "--generations", "3", "--fitness", "needle", "--algorithm", "critical-dim",
       "--search-attention"]


@pytest.mark.torchrun
def test_torchrun_cli_gives_the_one_process_result(tiny_model_dir, long_text_file, tmp_path, monkeypatch, capsys):
    launcher = torchrun()
    if launcher is None:
        pytest.skip("torchrun is not installed")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["search", "--model", str(tiny_model_dir), "--data", str(long_text_file), *CLI]
    job = subprocess.run([*launcher, "--standalone", "--nproc-per-node", str(WORLD), "-m", "longrope", *args,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=150)
    assert job.returncode == 0, job.stdout + job.stderr
    assert job.stdout.count("wrote ") == 1 and "evaluating on 2 ranks" in job.stdout  # rank 0 alone speaks
    assert "critical dimension: theoretical d_tcd = 6" in job.stdout

    from longrope.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' arithmetic, bit for bit
    try:
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    one, two = (json.loads((tmp_path / d / S.SUMMARY).read_text()) for d in ("one", "two"))
    assert one["best"] == two["best"] and one["best_fitness"] == two["best_fitness"]
    assert strip_seconds(S.read_history(tmp_path / "one")) == strip_seconds(S.read_history(tmp_path / "two"))
    assert two["environment"]["ranks"] == 2 and two["space"]["theoretical_critical_dim"] == 6
    assert (tmp_path / "two" / S.SCALING).read_text() == (tmp_path / "one" / S.SCALING).read_text()

    # an error on rank 0 (a finished search in --out) releases the other rank: exit 2, one message
    job = subprocess.run([*launcher, "--standalone", "--nproc-per-node", str(WORLD), "-m", "longrope", *args,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=150)
    assert job.returncode != 0
    assert (job.stdout + job.stderr).count("longrope: error: --out") == 1
