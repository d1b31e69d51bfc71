"""Command line: thin recipes over the package. Bad input -> one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

from . import distributed, models, runs
from . import scaling as sc
from .errors import UsageError

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


def resolve_scaling(spec: str | None, method: str | None, target_length: int | None,
                    info: models.RopeInfo, allow_context_mismatch: bool = False) -> sc.Scaling:
    """--scaling (a file or preset name) or --method with --target-length, checked against the model."""
    if spec and method:
        raise UsageError("give --scaling FILE or --method METHOD, not both")
    if spec:
        if target_length is not None:
            raise UsageError("--target-length goes with --method; a --scaling file carries its own target")
        scaling = sc.load(sc.preset_path(spec), info.dim)
    elif method is None:
        raise UsageError("give --scaling FILE or --method METHOD with --target-length N")
    else:
        scaling = sc.make(method, info.original_length, target_length, dim=info.dim, base=info.base)
    models.check_fits(scaling, info, allow_context_mismatch)
    return scaling


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model folder, .gguf file, or a name (smollm2-135m)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on GPU, float32 on CPU")


def add_scaling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scaling", help="scaling JSON (transformers rope-parameters form) or a preset name")
    p.add_argument("--method", choices=sc.METHODS, help="scaling method, with --target-length")
    p.add_argument("--target-length", type=parse_length, help="context to extend to, e.g. 64k")


def add_progress_args(p: argparse.ArgumentParser) -> None:
    """--quiet, for every long command (search, eval, demo, extend, finetune, pretrain): no progress
    display (`progress.Progress`: a bar on a terminal, a line every ~10 s otherwise)."""
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                   help="no progress display (a bar on a terminal, a line every ~10 s in a log); "
                        "--no-progress is the same")


def add_mismatch_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-context-mismatch", action="store_true",
                   help="accept a scaling made for another original context than the model's")


def device_and_dtype(args):
    device = str(models.resolve_device(args.device))
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return device, getattr(torch, dtype)


def interrupted(checkpoint_every: int, out) -> int:
    """Ctrl-C in a training command: say how to continue; exit code 130."""
    print(f"\ninterrupted; continue from the last checkpoint with the same command and --resume "
          f"(checkpoints every {checkpoint_every} steps in {out})", file=sys.stderr)
    return 130


def cmd_export(args) -> int:
    info = models.rope_info(models.load_config(args.model))
    # fail before loading weights
    scaling = resolve_scaling(args.scaling, args.method, args.target_length, info, args.allow_context_mismatch)
    device, dtype = device_and_dtype(args)
    model, tokenizer = models.load(args.model, dtype=dtype, device=device)
    models.attach(model, scaling, args.allow_context_mismatch)
    missing = models.needs_sidecar(scaling)
    if missing:
        print(f"note: {missing}: transformers' config cannot express this; it is stored in "
              f"{models.SIDECAR} and restored by longrope.load(), plain transformers ignores it")
    out = models.export(model, tokenizer, scaling, args.out, force=args.force,
                        allow_context_mismatch=args.allow_context_mismatch)
    _, max_positions = models.hf_rope_parameters(scaling, info)
    print(f"wrote {out} ({scaling.rope_type}, max_position_embeddings={max_positions})")
    return 0


def register_export(sub) -> None:
    p = sub.add_parser("export", help="write a Hugging Face checkpoint carrying a scaling")
    add_model_args(p)
    add_scaling_args(p)
    add_mismatch_arg(p)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)


# each recipe module owns its subcommand: register(subparsers) adds it with set_defaults(func=...)
RECIPES = ("eval", "search", "pretrain", "demo", "finetune", "extend")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="longrope", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    register_export(sub)
    for name in RECIPES:
        importlib.import_module(f".recipes.{name}", __package__).register(sub)
    return parser


RANK_ERROR_GRACE_S = 20.0  # how long a rank > 0 waits for rank 0 to report a shared error


# options whose values may name the command's input files or folders (comma lists for some)
INPUT_OPTIONS = ("model", "data", "eval_data", "exclude_data", "scaling", "init", "compare")


def input_paths(args) -> list[str]:
    """Every existing file or folder the command reads, from its options: --out must not touch them."""
    found = []
    for name in INPUT_OPTIONS:
        value = getattr(args, name, None)
        for item in value if isinstance(value, list) else [value]:
            for entry in str(item).split(",") if item else []:
                if entry.strip() and Path(entry.strip()).exists():
                    found.append(entry.strip())
    return found


def check_before_work(args) -> None:
    """What every command checks before it loads anything: the device, the output folder."""
    if getattr(args, "device", None) is not None:
        models.resolve_device(args.device)
    if getattr(args, "out", None) is not None:
        force, resumable = getattr(args, "force", False), hasattr(args, "resume")
        if resumable and args.resume and force:
            runs.check_out(args.out, force=True, resume=True)  # the one refusal of the pair
        # a resumable command judges an existing run of its own itself (resume it, or how to)
        runs.check_out(args.out, force=force, resume=resumable and not force, inputs=input_paths(args))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_before_work(args)
        code = args.func(args)
    except KeyboardInterrupt:
        again = ("run the same command with --resume to continue" if hasattr(args, "resume")
                 else "nothing was written to --out" if getattr(args, "out", None) is not None
                 else "nothing was written")
        print(f"\nlongrope: interrupted; {again}", file=sys.stderr)
        _leave_process_group(wait=False)
        return 130
    except UsageError as exc:
        if distributed.world_size() > 1 and distributed.launched_rank() != 0 and not exc.rank_specific:
            # under torchrun every rank meets the same bad input: rank 0 prints it, torchrun then
            # stops this rank; exiting first could get rank 0 stopped before it prints
            time.sleep(RANK_ERROR_GRACE_S)
        print(f"longrope: error: {exc}", file=sys.stderr)
        _leave_process_group(wait=False)
        return 2
    _leave_process_group(wait=code == 0)
    return code


def _leave_process_group(wait: bool = True) -> None:
    """Under torchrun, leave the process group a command joined: a gloo group left to the
    interpreter's exit can abort the process ("terminate called without an active exception").
    `wait`: first a barrier, so that nobody tears down while another rank's last messages are in
    flight (only after success: after a failure the other ranks may never arrive). After
    an unexpected exception nothing is done: the process exits and torchrun stops the others."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def entry() -> None:
    """The `longrope` console script and `python -m longrope`: main(), then exit with its code;
    under torchrun without the interpreter's teardown (`distributed.exit_without_teardown`)."""
    code = main()
    if distributed.world_size() > 1:
        distributed.exit_without_teardown(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
