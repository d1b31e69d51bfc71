"""Progress of the long commands (search, eval, demo, extend, finetune, pretrain), shown one way.

    with Progress(total=40, desc="search", unit="evals") as bar:
        for ...:
            bar.update(1, best=3.21)

How it is shown depends on the stream (standard error by default):

- a terminal: a tqdm bar, redrawn in place;
- anything else (a log file, CI, nohup, a pipe): a plain line at most every `interval` seconds
  (10 by default; $LONGROPE_PROGRESS_INTERVAL sets another, 0 for a line at every update) and a
  last one when the progress closes, e.g.

      search: 12/40 evals (30%), 0:41 elapsed, ~1:08 left, best=3.21
      search: 40/40 evals (100%), 2:17 elapsed, best=3.02, done

  Work over before its first line was due leaves no line at all: a quick phase is not worth one,
  and a command's error stays the one line on standard error;
- `quiet=True` (the commands' --quiet): nothing at all (the counts are still kept).

The time left is what is left at this session's average rate; work done before the session (a
resumed run: `initial`, `skip`) is counted but does not speed the rate up. Under a time budget
(`limit_time`) the estimate never exceeds what the budget leaves.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

INTERVAL = 10.0  # seconds between two plain lines (default)
INTERVAL_ENV = "LONGROPE_PROGRESS_INTERVAL"  # overrides it, e.g. 0 for a line at every update
# tqdm's default layout with the unit after the counts; {remaining} is ours (`Progress.remaining`)
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def clock(seconds: float) -> str:
    """41 -> '0:41', 4475 -> '1:14:35' (as tqdm writes durations)."""
    s = max(0, int(round(seconds)))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _now() -> float:
    return time.monotonic()  # (a function, so that tests can move the clock)


def default_interval() -> float:
    """Seconds between plain lines: $LONGROPE_PROGRESS_INTERVAL, else INTERVAL."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, INTERVAL)))
    except ValueError:
        return INTERVAL


def _value(v: Any) -> str:
    """A postfix value as shown: floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Progress of `total` units of work (None: unknown) called `desc`, counted in `unit`.

    `update(n, **postfix)` counts n more units done (postfix: values shown after the counts, e.g.
    best=3.21); `update_to(count)` sets the count; `skip(n)` counts units done earlier (a resumed
    run) without timing them; `set_total(n)` corrects the total; `limit_time(seconds)` caps the
    estimate of the time left. Use it as a context manager or call `close()`."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", *, quiet: bool = False,
                 stream: TextIO | None = None, interval: float | None = None, initial: int = 0,
                 leave: bool = True):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self.postfix: dict[str, Any] = {}
        self.stream = sys.stderr if stream is None else stream
        self.interval = default_interval() if interval is None else interval
        self.closed = False
        self._start = _now()
        self._timed_from = initial  # the count this session's rate is measured from
        self._deadline: float | None = None  # when a time budget stops the work (monotonic clock)
        self._last_line = self._start
        self._lines = 0  # plain lines written
        # how it is shown: "quiet", "bar" (a terminal) or "lines"
        self.mode = "quiet" if quiet else ("bar" if _is_terminal(self.stream) else "lines")
        self._bar = self._make_bar(leave) if self.mode == "bar" else None

    # -- counting --------------------------------------------------------------------------
    def update(self, n: int = 1, **postfix: Any) -> None:
        """`n` more units done (0: only new postfix values)."""
        self.n += n
        self.postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _value(v) for k, v in self.postfix.items()}, refresh=False)
            self._bar.update(n) if n else self._bar.refresh()
        self._maybe_line()

    def update_to(self, count: int, **postfix: Any) -> None:
        """The count is now `count` (e.g. a training step or the search's evaluations)."""
        self.update(count - self.n, **postfix)

    def skip(self, n: int) -> None:
        """`n` units done before this session (a resumed run): counted, not timed."""
        self.n += n
        self._timed_from += n
        if self._bar is not None:
            # moved past tqdm's own rate bookkeeping, so the jump does not look like speed
            self._bar.n += n
            self._bar.last_print_n += n
            self._bar.initial += n
            self._bar.refresh()

    def set_total(self, total: int | None) -> None:
        if total == self.total:
            return
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.bar_format = None if total is None else BAR_FORMAT
            self._bar.refresh()

    def limit_time(self, seconds: float | None) -> None:
        """The work stops at the latest `seconds` from now (a time budget; None: no budget)."""
        self._deadline = None if seconds is None else _now() + max(0.0, seconds)

    # -- what is shown ---------------------------------------------------------------------
    def elapsed(self) -> float:
        return _now() - self._start

    def remaining(self) -> float | None:
        """Estimated seconds left: what is left at this session's average rate, capped by the time
        budget; None when there is nothing to go on yet."""
        now = _now()
        estimate = None
        done = self.n - self._timed_from
        if self.total is not None and done > 0:
            estimate = max(0, self.total - self.n) * (now - self._start) / done
        if self._deadline is not None:
            budget = max(0.0, self._deadline - now)
            estimate = budget if estimate is None else min(estimate, budget)
        return estimate

    def line(self, final: str = "") -> str:
        """The plain line: 'search: 12/40 evals (30%), 0:41 elapsed, ~1:08 left, best=3.21'
        (`final`: appended instead of the time left, e.g. 'done')."""
        if self.total:
            count = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            count = f"{self.n} {self.unit}" if self.total is None else f"{self.n}/{self.total} {self.unit}"
        parts = [count, f"{clock(self.elapsed())} elapsed"]
        left = None if final else self.remaining()
        if left is not None:
            parts.append(f"~{clock(left)} left")
        parts += [f"{k}={_value(v)}" for k, v in self.postfix.items()]
        if final:
            parts.append(final)
        return f"{self.desc}: " * bool(self.desc) + ", ".join(parts)

    def note(self, text: str) -> None:
        """A line of its own among the progress (a search's generation, say); nothing when quiet."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        elif self.mode == "lines":
            self._write(text)

    def _maybe_line(self) -> None:
        if self.mode != "lines":
            return
        now = _now()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self._write(self.line())
            self._lines += 1

    def _write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _make_bar(self, leave: bool):
        progress = self

        class Bar(tqdm):
            @property
            def format_dict(self):  # our estimate of the time left (rate of this session, time budget)
                d = super().format_dict
                left = progress.remaining()
                d["remaining"] = "?" if left is None else self.format_interval(left)
                return d

        return Bar(total=self.total, desc=self.desc or None, unit=self.unit, initial=self.n, file=self.stream,
                   leave=leave, dynamic_ncols=True, bar_format=None if self.total is None else BAR_FORMAT)

    # -- the end ---------------------------------------------------------------------------
    def close(self, final: str = "done") -> None:
        """Stop; a plain stream that had lines gets the last one (`final` says how it ended)."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and self._lines:
            self._write(self.line(final))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.close("done" if kind is None else "interrupted" if issubclass(kind, KeyboardInterrupt) else "stopped")


class Counter:
    """A `(done, total)` callback for the layers below this one (data, pipeline), which may not
    import it: the first call opens a Progress with that total, the one reaching it closes it."""

    def __init__(self, desc: str, unit: str = "it", *, quiet: bool = False):
        self.desc, self.unit, self.quiet = desc, unit, quiet
        self.bar: Progress | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = Progress(total, self.desc, self.unit, quiet=self.quiet)
        self.bar.update_to(done)
        if done >= total:
            self.bar.close()


def step_callback(bar: Progress):
    """A training callback (`train.StepInfo` after each optimizer step) that moves `bar` to the
    step, with the loss, learning rate and throughput; the steps a resumed run had made before its
    first count without time."""

    def callback(info) -> None:
        if bar.n == 0 and info.step > 1:
            bar.skip(info.step - 1)
        postfix = {}
        if info.loss is not None:
            postfix = {"loss": f"{info.loss:.4f}", "lr": f"{info.lr:.2e}"}
            if info.tokens_per_s:
                postfix["tok_s"] = f"{info.tokens_per_s:,.0f}"
        bar.update_to(info.step, **postfix)

    return callback
