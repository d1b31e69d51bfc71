"""Runs: the one place that decides where a command may write, and writes it atomically.

Every output folder longrope creates holds a marker file (`MARKER`). That is how `--force`
knows a folder is ours to replace: it never replaces a folder without one, nor the current
folder or one above it, nor a folder that is, holds or lies inside an input of the command.

Two ways to write a folder:
- `staged(out, force)`: a command that writes its output in one go (export, eval, demo) writes
  into a temporary sibling, which then takes the place of `out` (`replace_dir`).
- `open_dir(out, force, resume)`: a command that writes as it goes and resumes after a crash
  (search, pretrain, finetune, extend) writes into `out` itself; with `force` the old folder is
  moved aside first and deleted once the new one exists.
Either way a crash at any point leaves the old output or the new one, never a mix.
Folders are made with `os.mkdir`, so they get the user's umask (a `tempfile.mkdtemp` folder
would be 0700).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import secrets
import shutil
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch

from .errors import UsageError

MARKER = ".longrope"  # written into every output folder longrope creates


def _where(path: Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(path)))


def input_identity(spec: str) -> str:
    """An input (`--model`, `--data`) as a resume identity records it: an existing file or folder
    by its absolute path (the same run continued from another folder matches), a name as it is."""
    return os.path.abspath(spec) if os.path.exists(spec) else spec


def existing_paths(values: Iterable) -> list[str]:
    """The existing files and folders that option values name (a value may be a list, or a comma
    list of paths): a command's inputs, which its --out must not touch (`check_out`)."""
    found = []
    for value in values:
        for item in value if isinstance(value, list) else [value]:
            entries = [e.strip() for e in str(item).split(",")] if item else []
            found += [e for e in entries if e and Path(e).exists()]
    return found


def _related(a: Path, b: Path) -> bool:
    """a is b, lies inside b, or holds b."""
    return a == b or a in b.parents or b in a.parents


def written_by_longrope(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def check_out(out, *, force: bool = False, resume: bool = False, resumable: bool = False,
              inputs: Iterable = ()) -> Path:
    """The guard every command runs on its output folder before any work; returns it as given.
    Refused, with one line naming the problem and the fix, whatever `force` says: an empty path;
    the current folder or one above it; a path that is, holds or lies inside an existing input;
    a file; a non-empty folder longrope did not write; a place that cannot be written. Refused
    unless `force` or `resume`: an existing folder (longrope's, or empty) (`resumable`: the command can continue it,
    and the message says so). `resume` and `force` exclude each other."""
    if out is None or not str(out).strip():
        raise UsageError("--out is empty; give a new folder, e.g. --out results")
    if resume and force:
        raise UsageError("--resume and --force contradict each other: --force starts over, --resume continues")
    given, out = str(out), _where(Path(out))
    cwd = _where(Path.cwd())
    if out == cwd or out in cwd.parents:
        raise UsageError(f"--out {given} is the current folder or one above it; give a new folder, e.g. --out results")
    for item in inputs:
        if item is None or not str(item).strip() or not os.path.exists(item):
            continue
        if _related(out, _where(Path(item))):
            raise UsageError(f"--out {given} is, holds or lies inside the input {item}; longrope never writes "
                             "into its inputs: give another folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {given} is a file; give a folder")
    if out.is_dir():
        if any(out.iterdir()) and not written_by_longrope(out):
            raise UsageError(f"--out {given} is not empty and longrope did not write it (no {MARKER} marker); "
                             "--force replaces only longrope's own outputs: give another folder")
        if not (force or resume):
            how = "--resume to continue it, " if resumable else ""
            raise UsageError(f"--out {given} already exists; choose another folder, or pass {how}--force to replace it")
    _check_writable(out, given)
    return Path(given)


def _check_writable(out: Path, given: str) -> None:
    """Probe the nearest existing folder at or above `out` by making (and removing) a folder in
    it: permission bits alone do not tell (root, read-only mounts)."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--out {given}: {probe} is a file, so no folder can be made there; give another path")
    try:
        trial = probe / f".longrope-write-test-{secrets.token_hex(4)}"
        os.mkdir(trial)
        os.rmdir(trial)
    except OSError as exc:
        raise UsageError(f"--out {given}: cannot write in {probe} ({exc.strerror or exc}); "
                         "give a folder you can write to") from None


def make_dir(path: Path, command: str = "") -> Path:
    """Create `path` (and its parents) with the user's umask, marked as longrope's."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    marker = path / MARKER
    if not marker.is_file():
        marker.write_text(json.dumps({"written_by": "longrope", "command": command}) + "\n")
    return path


def _sibling(out: Path, tag: str) -> Path:
    return out.with_name(f".{out.name}.{tag}-{secrets.token_hex(4)}")


def replace_dir(new: Path, out: Path) -> None:
    """Put the folder `new` in the place of `out`: the old one is moved aside, the new one
    renamed in, then the old one deleted (a crash leaves one of the two in place)."""
    out = Path(out)
    if not out.exists():
        os.replace(new, out)
        return
    aside = _sibling(out, "old")
    os.replace(out, aside)
    os.replace(new, out)
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def staged(out, force: bool = False, command: str = "") -> Iterator[Path]:
    """Yield a temporary sibling of `out` to write a whole output into; on success it replaces
    `out`, on any failure (Ctrl-C included) it is removed and `out` is as it was."""
    out = check_out(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_dir(_sibling(out, "tmp"), command)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def open_dir(out, force: bool = False, resume: bool = False, command: str = "") -> Path:
    """The output folder of a command that writes as it goes: made if missing; with `force`, an
    old one (longrope's: `check_out`) is moved aside and deleted once the new one exists."""
    out = check_out(out, force=force, resume=resume, resumable=True)
    if force and out.exists():
        aside = _sibling(out, "old")
        os.replace(out, aside)
        make_dir(out, command)
        shutil.rmtree(aside, ignore_errors=True)
    return make_dir(out, command)


@contextmanager
def atomic_file(path) -> Iterator[Path]:
    """Yield a temporary name beside `path` to write a file under (`.NAME.tmp-PID`); once the
    block ends, the file is flushed to disk and takes `path`'s place, so a reader sees the old
    content or the new, never a torn one. On any failure the temporary file is removed (a killed
    process leaves it: callers may delete `.NAME.tmp-*` leftovers)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the new content is on disk before it takes the old one's name
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path, text: str | bytes) -> None:
    """Write a file atomically (`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)


# --------------------------------------------------------------------------------------------
# what a run records about itself, and how a resumed run checks it is the same run

PACKAGES = ("longrope", "torch", "transformers", "tokenizers", "numpy", "gguf", "matplotlib")


def versions() -> dict:
    """Python and the installed versions of the packages a result depends on (None: absent)."""
    found: dict = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def environment(device=None) -> dict:
    """Package versions, Python, platform, device and the date (UTC): recorded beside every result."""
    env = {"python": sys.version.split()[0], "platform": platform.platform(),
           "packages": {k: v for k, v in versions().items() if k != "python"},
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "device": str(device)}
    try:
        if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
            env["device_name"] = torch.cuda.get_device_name(torch.device(device))
            env["cuda"] = torch.version.cuda
        else:
            env["device_name"] = platform.processor() or platform.machine()
        env["torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001 - environment details are best effort
        pass
    return env


def differences(saved: dict, given: dict) -> list[str]:
    """The keys whose values differ between a saved run's settings and the ones given now, sorted:
    a resumed run must be the same run (each command words its refusal)."""
    return sorted(k for k in set(saved) | set(given) if saved.get(k) != given.get(k))
