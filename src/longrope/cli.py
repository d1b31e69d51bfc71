"""Command line: thin recipes over the package. Bad input -> one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing
from collections.abc import Sequence

import torch

from . import data, distributed, models, runs
from . import scaling as sc
from .errors import UsageError
from .progress import Counter

# each recipe module owns its subcommand: register(subparsers) adds it (`add_command`)
RECIPES = ("export", "eval", "search", "pretrain", "demo", "finetune", "extend")
# options whose values may name the command's input files or folders (comma lists for some)
INPUT_OPTIONS = ("model", "data", "eval_data", "exclude_data", "scaling", "init", "readjust", "compare")


class Parser(argparse.ArgumentParser):
    """argparse with bad input as one line (the problem and where to look), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_length(text: str) -> int:
    """'65536', '64k', '2m', '2048k' -> tokens (k = 1024): `scaling.parse_length` for argparse."""
    try:
        return sc.parse_length(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_lengths(text: str) -> list[int]:
    """'8k,16k,32k' -> sorted distinct lengths; an empty item ('8k,,16k') is refused."""
    items = [t.strip() for t in str(text).split(",")]
    if not any(items) or not all(items):
        raise argparse.ArgumentTypeError(f"not a list of lengths: {text!r} (use e.g. 8k,16k,32k)")
    return sorted(dict.fromkeys(parse_length(t) for t in items))


def add_command(sub, name: str, doc: str, func) -> argparse.ArgumentParser:
    """Subcommand `name`, run by `func(args)`: a recipe's module docstring is its description, and
    its first line, after "`longrope NAME`: ", its entry in the list of commands."""
    p = sub.add_parser(name, help=doc.split("\n", 1)[0].split(": ", 1)[-1].rstrip("."), description=doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p


def add_model_args(p) -> None:
    p.add_argument("--model", required=True, help="HF model folder, .gguf file, or a name (smollm2-135m)")
    add_device_args(p)


def add_device_args(p, dtypes=("float32", "bfloat16", "float16"),
                    dtype_help="default: bfloat16 on GPU, float32 on CPU") -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=dtypes, help=dtype_help)


def add_scaling_args(p) -> None:
    p.add_argument("--scaling", help="scaling JSON (transformers rope-parameters form) or a preset name")
    p.add_argument("--method", choices=sc.METHODS, help="scaling method, with --target-length")
    p.add_argument("--target-length", type=parse_length, help="context to extend to, e.g. 64k")


def add_progress_args(p) -> None:
    """--quiet, for every long command: no progress display (`progress.Progress`)."""
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                   help="no progress display (a bar on a terminal, a line every ~10 s in a log); "
                        "--no-progress is the same")


def add_mismatch_arg(p) -> None:
    p.add_argument("--allow-context-mismatch", action="store_true",
                   help="accept a scaling made for another original context than the model's")


def add_config_options(parser, config, only: Sequence[str] | None = None) -> None:
    """Fields of a config dataclass (a class, or an instance whose values are then the defaults) as
    options --field-name, those in `only` in that order: typed by the field, with the "choices" and
    "help" of its metadata (the nearest class's that has any) and its default. No default: a
    required option; no help: a hidden one; a bool that is True by default: --no-field-name, its
    help saying what that does. Each option's own default is None, "not given" (`config_values`)."""
    cls = config if isinstance(config, type) else type(config)
    fields, hints = {f.name: f for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)
    for name in only or fields:
        default = fields[name].default if config is cls else getattr(config, name)
        meta = _metadata(cls, name)
        kind = next(t for t in typing.get_args(hints[name]) or (hints[name],) if t is not type(None))  # X | None
        text = meta.get("help")
        if text and kind is not bool and default not in (None, dataclasses.MISSING):
            text += f" (default {default})"
        flag, kwargs = name.replace("_", "-"), {}
        if kind is bool:
            flag, kwargs["action"] = (f"no-{flag}", "store_false") if default else (flag, "store_true")
        else:
            kwargs.update(type=kind, choices=meta.get("choices"), required=default is dataclasses.MISSING)
        parser.add_argument(f"--{flag}", dest=name, default=None,
                            help=text.replace("%", "%%") if text else argparse.SUPPRESS, **kwargs)


def _metadata(cls, name: str):
    """A field's metadata, from the nearest class that gives it any: a subclass that redefines a
    field only for another default keeps the parent's help."""
    for klass in cls.__mro__:
        field = getattr(klass, "__dataclass_fields__", {}).get(name)
        if field is not None and field.metadata:
            return field.metadata
    return {}


def config_values(args, config, **overrides) -> dict:
    """The values of a config's fields that were given as options named like them (None: not
    given; see `add_config_options`), then `overrides`: what to build the config from."""
    names = {f.name for f in dataclasses.fields(config)}
    return {**{k: v for k, v in vars(args).items() if k in names and v is not None}, **overrides}


def device_and_dtype_names(args) -> tuple[str, str]:
    """--device (default: cuda if available) and --dtype (default: bfloat16 on GPU, float32 on CPU)."""
    device = str(models.resolve_device(args.device))
    return device, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")


def device_and_dtype(args) -> tuple[str, torch.dtype]:
    device, dtype = device_and_dtype_names(args)
    return device, getattr(torch, dtype)


def load_model(args):
    """(model, tokenizer, its RoPE) of --model on --device in --dtype (`device_and_dtype`)."""
    device, dtype = device_and_dtype(args)
    model, tokenizer = models.load(args.model, dtype=dtype, device=device)
    return model, tokenizer, models.rope_info(model.config)


def documents(spec, tokenizer, quiet: bool) -> list[data.TokenizedDocument]:
    """--data tokenised (cached), counted on the progress display."""
    return data.load_tokenized(spec, tokenizer, progress=Counter("tokenising", "docs", quiet=quiet))


def interrupted(hint: str) -> int:
    """Ctrl-C: one line on stderr saying how to go on; exit code 130."""
    print(f"\nlongrope: interrupted; {hint}", file=sys.stderr)
    return 130


def training_interrupted(checkpoint_every: int, out) -> int:
    return interrupted(f"continue from the last checkpoint with the same command and --resume "
                       f"(checkpoints every {checkpoint_every} steps in {out})")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="longrope", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in RECIPES:
        importlib.import_module(f".recipes.{name}", __package__).register(sub)
    return parser


def check_before_work(args) -> None:
    """What every command checks before it loads anything: the device, the output folder."""
    if getattr(args, "device", None) is not None:
        models.resolve_device(args.device)
    if getattr(args, "out", None) is not None:
        force, resumable = getattr(args, "force", False), hasattr(args, "resume")
        if resumable and args.resume and force:
            runs.check_out(args.out, force=True, resume=True)  # the one refusal of the pair
        # a resumable command judges an existing run of its own itself (resume it, or how to)
        inputs = runs.existing_paths(getattr(args, name, None) for name in INPUT_OPTIONS)
        runs.check_out(args.out, force=force, resume=resumable and not force, inputs=inputs)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Under torchrun the process group it joined is left at the end, after a
    failure without waiting for the others; after an unexpected exception nothing is done: the
    process exits and torchrun stops the others."""
    args = build_parser().parse_args(argv)
    try:
        check_before_work(args)
        code = args.func(args)
    except KeyboardInterrupt:
        resumable = hasattr(args, "resume") and getattr(args, "out", None) is not None  # what it did is kept
        code = interrupted("run the same command with --resume to continue" if resumable
                           else "nothing was written to --out" if getattr(args, "out", None) is not None
                           else "nothing was written")
    except UsageError as exc:
        distributed.before_error_exit(exc)
        print(f"longrope: error: {exc}", file=sys.stderr)
        code = 2
    distributed.leave(wait=code == 0)
    return code


def entry() -> None:
    """The `longrope` console script and `python -m longrope`: main(), then exit with its code;
    under torchrun without the interpreter's teardown (`distributed.exit_without_teardown`)."""
    code = main()
    if distributed.world_size() > 1:
        distributed.exit_without_teardown(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
