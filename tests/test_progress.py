"""longrope.progress: one progress display for the long commands (plain lines when the output is
not a terminal, a tqdm bar when it is, nothing with --quiet), and the search counting evaluations."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from longrope import progress as P
from longrope import search as S
from longrope.cli import main
from longrope.progress import Progress

SPACE = S.SearchSpace(dim=16, base=10000.0, original_length=64, target_length=256)
COUNT = re.compile(r"^search: (\d+)/(\d+) evals \(\d+%\)")


def distance(scaling) -> float:
    """A synthetic fitness (no model): how far the factors are from 2."""
    return sum((v - 2.0) ** 2 for v in scaling.long_factor)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch):
    """A clock the test moves by hand: now[0] seconds."""
    now = [1000.0]
    monkeypatch.setattr(P, "_now", lambda: now[0])
    return now


def counts(text: str) -> list[tuple[int, int]]:
    return [(int(m.group(1)), int(m.group(2))) for m in map(COUNT.match, text.splitlines()) if m]


# --------------------------------------------------------------------------------------------
# the display


def test_plain_lines_with_interval_0_count_every_update_and_end_at_the_total():
    stream = io.StringIO()
    with Progress(4, "eval", "cells", stream=stream, interval=0) as bar:
        for i in range(4):
            bar.update(1, best=3.25 - i / 100)
    lines = stream.getvalue().splitlines()
    assert [re.match(r"eval: (\d+)/4 cells", line).group(1) for line in lines] == ["1", "2", "3", "4", "4"]
    assert lines[0].startswith("eval: 1/4 cells (25%), 0:00 elapsed, ~0:00 left, best=3.25")
    assert lines[-1] == "eval: 4/4 cells (100%), 0:00 elapsed, best=3.22, done"


def test_quiet_writes_nothing_on_a_log_or_a_terminal():
    for stream in (io.StringIO(), Terminal()):
        with Progress(3, "eval", "cells", stream=stream, interval=0, quiet=True) as bar:
            bar.update(2, best=1.0)
            bar.skip(1)
        assert stream.getvalue() == "" and bar.n == 3


def test_lines_at_most_every_interval_with_the_time_left(clock):
    stream = io.StringIO()
    bar = Progress(40, "search", "evals", stream=stream, interval=10)
    for _ in range(25):  # one unit a second
        clock[0] += 1
        bar.update(1)
    assert stream.getvalue().splitlines() == ["search: 10/40 evals (25%), 0:10 elapsed, ~0:30 left",
                                              "search: 20/40 evals (50%), 0:20 elapsed, ~0:20 left"]
    bar.limit_time(5)  # a time budget: at most 5 s left, whatever the rate says
    clock[0] += 10
    bar.update(1)
    assert stream.getvalue().splitlines()[-1] == "search: 26/40 evals (65%), 0:35 elapsed, ~0:00 left"
    bar.close()
    assert stream.getvalue().splitlines()[-1] == "search: 26/40 evals (65%), 0:35 elapsed, done"


def test_quick_work_leaves_no_line(clock):
    stream = io.StringIO()
    with Progress(5, "tokenising", "docs", stream=stream, interval=10) as bar:
        for _ in range(5):
            clock[0] += 1
            bar.update()
    assert stream.getvalue() == ""


def test_work_done_before_counts_without_speeding_up_the_estimate(clock):
    stream = io.StringIO()
    bar = Progress(40, "finetune", "steps", stream=stream, interval=0)
    bar.skip(20)  # a resumed run
    for _ in range(10):
        clock[0] += 1
        bar.update(1)
    assert stream.getvalue().splitlines()[-1] == "finetune: 30/40 steps (75%), 0:10 elapsed, ~0:10 left"


def test_a_terminal_gets_a_tqdm_bar():
    stream = Terminal()
    with Progress(3, "eval", "cells", stream=stream, interval=0) as bar:
        for _ in range(3):
            bar.update(1, best=2.5)
    out = stream.getvalue()
    assert "\r" in out and "3/3 cells" in out and "100%|" in out and "best=2.5" in out
    assert "elapsed" not in out  # no plain lines


# --------------------------------------------------------------------------------------------
# the search counts evaluations


class Width3:
    """An evaluator taking 3 candidates a call (as Batched and the distributed one do)."""

    width = 3

    def __call__(self, scalings):
        return [distance(s) for s in scalings]


def test_the_engine_reports_every_evaluation_from_the_first():
    seen = []
    config = S.SearchConfig(population=8, mutations=2, crossovers=2, parents=4, generations=20, max_evals=17)
    S.run(SPACE, config=config, evaluator=Width3(), on_evaluation=seen.append)
    assert [i["evals"] for i in seen] == list(range(1, 18))  # one by one, also inside a batch
    assert [i["generation"] for i in seen[:8]] == [0] * 8  # the initial population is counted
    assert not any(i["earlier"] or i["start"] for i in seen)
    assert seen[-1]["best"] == min(i["fitness"] for i in seen)


def test_search_progress_counts_evaluations_to_max_evals():
    stream = io.StringIO()
    config = S.SearchConfig(population=8, mutations=2, crossovers=2, parents=4, generations=20, max_evals=40)
    assert S.planned_evals(config) == 40 and S.planned_evals(S.SearchConfig(population=8, mutations=2,
                                                                            crossovers=2, generations=20)) == 88
    with Progress(S.planned_evals(config), "search", "evals", stream=stream, interval=0) as bar:
        S.run(SPACE, distance, config, **S.progress_hooks(bar, config))
    found = counts(stream.getvalue())
    assert found[0] == (1, 40) and found[-1] == (40, 40)
    assert [n for n, _ in found[:8]] == list(range(1, 9))  # through the initial population
    assert stream.getvalue().splitlines()[-1].endswith(", done")


def test_search_progress_ends_at_n_of_n_and_resumes_from_the_checkpoint(tmp_path):
    config = S.SearchConfig(population=6, mutations=2, crossovers=2, parents=3, generations=2)
    stream = io.StringIO()
    with Progress(S.planned_evals(config), "search", "evals", stream=stream, interval=0) as bar:
        first = S.run(SPACE, distance, config, tmp_path / "s", **S.progress_hooks(bar, config))
    n = first.summary["evals"]
    assert counts(stream.getvalue())[-1] == (n, n)  # planned again after each generation

    # a larger budget later: the evaluations made count from the start, the plan is the new one's
    more = S.SearchConfig(population=6, mutations=2, crossovers=2, parents=3, generations=4)
    stream = io.StringIO()
    with Progress(S.planned_evals(more), "search", "evals", stream=stream, interval=0) as bar:
        second = S.run(SPACE, distance, more, tmp_path / "s", resume=True, **S.progress_hooks(bar, more))
    found = counts(stream.getvalue())
    total = second.summary["evals"]
    assert found[0] == (n, n + 2 * 4) and found[-1] == (total, total)


def test_search_time_left_never_exceeds_what_max_minutes_leaves(clock):
    config = S.SearchConfig(population=8, mutations=2, crossovers=2, parents=4, generations=20, max_minutes=5)
    bar = Progress(S.planned_evals(config), "search", "evals", stream=io.StringIO(), interval=0)
    hooks = S.progress_hooks(bar, config)
    clock[0] += 60  # one evaluation a minute: 87 to go would be 87 minutes
    hooks["on_evaluation"]({"evals": 1, "generation": 0, "fitness": 3.0, "best": 3.0, "seconds": 60.0,
                            "earlier": False, "start": False})
    assert bar.remaining() == pytest.approx(240)  # the budget's 5 minutes less the one spent
    assert bar.line().startswith("search: 1/88 evals (1%), 1:00 elapsed, ~4:00 left, best=3")


# --------------------------------------------------------------------------------------------
# the commands


SMALL = ["--target-length", "128", "--samples", "1", "--population", "8", "--mutations", "2", "--crossovers", "2",
         "--parents", "4", "--generations", "20"]  # 8 + 20 × 4 = 88 evaluations without a cap


def test_search_command_in_a_log_file_shows_evaluations_to_max_evals(tiny_model_dir, long_text_file, tmp_path):
    out = tmp_path / "search"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), P.INTERVAL_ENV: "0"}
    with open(tmp_path / "stderr.log", "w") as err:
        proc = subprocess.run([sys.executable, "-m", "longrope", "search", "--model", str(tiny_model_dir),
                               "--data", str(long_text_file), "--out", str(out), "--device", "cpu", *SMALL,
                               "--max-evals", "40"], env=env, stdout=subprocess.DEVNULL, stderr=err, timeout=300)
    text = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 0, text
    found = counts(text)
    assert found and found[-1] == (40, 40), text
    last = [line for line in text.splitlines() if line.startswith("search:")][-1]
    assert last.startswith("search: 40/40 evals (100%)") and last.endswith(", done")
    # progress before the first generation (the initial population, 8 evaluations) was over
    first_generation = sum(1 for r in S.read_history(out) if r["generation"] == 0)
    assert first_generation == 8
    assert [n for n, _ in found if n <= first_generation] == list(range(1, 9))


def test_quiet_search_shows_no_progress(tiny_model_dir, long_text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(P.INTERVAL_ENV, "0")
    argv = ["search", "--model", str(tiny_model_dir), "--data", str(long_text_file), "--device", "cpu", *SMALL,
            "--max-evals", "12"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert counts(capsys.readouterr().err)[-1] == (12, 12)
    assert main([*argv, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert counts(err) == [] and "elapsed" not in err


@pytest.mark.parametrize("command", [["search"], ["eval", "ppl"], ["eval", "passkey"], ["demo"], ["extend"],
                                     ["finetune"], ["pretrain"]])
def test_every_long_command_has_quiet(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "--quiet" in capsys.readouterr().out


def test_eval_ppl_lines_count_cells(tiny_model_dir, long_text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(P.INTERVAL_ENV, "0")
    assert main(["eval", "ppl", "--model", str(tiny_model_dir), "--data", str(long_text_file), "--lengths", "64,128",
                 "--docs", "1", "--compare", "none,linear", "--device", "cpu"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("perplexity:")]
    assert [line.split()[1:3] for line in lines] == [["1/4", "cells"], ["2/4", "cells"], ["3/4", "cells"],
                                                     ["4/4", "cells"], ["4/4", "cells"]]
    assert lines[-1].endswith("done")
