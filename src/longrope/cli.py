"""Command line: thin recipes over the package. Bad input -> one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import models
from . import scaling as sc
from .errors import UsageError

PRESETS = Path(__file__).parent / "presets"


def parse_length(text: str) -> int:
    """'65536', '64k', '2m', '2048k' -> tokens (k = 1024)."""
    t = str(text).strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a length: {text!r} (use e.g. 65536 or 64k)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"length must be positive, got {text!r}")
    return value


def resolve_scaling(spec: str | None, method: str | None, target_length: int | None,
                    info: models.RopeInfo) -> sc.Scaling:
    """--scaling (a file or preset name) or --method with --target-length, checked against the model."""
    if spec:
        preset = PRESETS / f"{spec}.json"
        path = preset if not Path(spec).exists() and preset.is_file() else Path(spec)
        if not path.is_file():
            raise UsageError(f"--scaling {spec}: no such file or preset (presets: "
                             f"{', '.join(p.stem for p in sorted(PRESETS.glob('*.json'))) or 'none'})")
        return sc.load(path, info.dim)
    if method is None:
        raise UsageError("give --scaling FILE or --method METHOD with --target-length N")
    return sc.make(method, info.original_length, target_length, dim=info.dim, base=info.base)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model folder, .gguf file, or a name (smollm2-135m)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on GPU, float32 on CPU")


def add_scaling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scaling", help="scaling JSON (transformers rope-parameters form) or a preset name")
    p.add_argument("--method", choices=sc.METHODS, help="scaling method, with --target-length")
    p.add_argument("--target-length", type=parse_length, help="context to extend to, e.g. 64k")


def device_and_dtype(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    return device, getattr(torch, dtype)


def interrupted(checkpoint_every: int, out) -> int:
    """Ctrl-C in a training command: say how to continue; exit code 130."""
    print(f"\ninterrupted; continue from the last checkpoint with the same command and --resume "
          f"(checkpoints every {checkpoint_every} steps in {out})", file=sys.stderr)
    return 130


def cmd_export(args) -> int:
    info = models.rope_info(models.load_config(args.model))
    scaling = resolve_scaling(args.scaling, args.method, args.target_length, info)  # fail before loading weights
    device, dtype = device_and_dtype(args)
    model, tokenizer = models.load(args.model, dtype=dtype, device=device)
    models.attach(model, scaling)
    missing = models.needs_sidecar(scaling)
    if missing:
        print(f"note: {missing}: transformers' config cannot express this; it is stored in "
              f"{models.SIDECAR} and restored by longrope.load(), plain transformers ignores it")
    out = models.export(model, tokenizer, scaling, args.out, force=args.force)
    print(f"wrote {out} ({scaling.rope_type}, max_position_embeddings={scaling.target_length or info.original_length})")
    return 0


def register_export(sub) -> None:
    p = sub.add_parser("export", help="write a Hugging Face checkpoint carrying a scaling")
    add_model_args(p)
    add_scaling_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)


# each recipe module owns its subcommand: register(subparsers) adds it with set_defaults(func=...)
RECIPES = ("eval", "search", "pretrain", "demo", "finetune", "extend")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="longrope", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    register_export(sub)
    for name in RECIPES:
        try:
            module = importlib.import_module(f".recipes.{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.recipes.{name}":
                raise
            continue  # recipe not written yet
        module.register(sub)
    return parser


RANK_ERROR_GRACE_S = 20.0  # how long a rank > 0 waits for rank 0 to report a shared error


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except UsageError as exc:
        from . import parallel

        if parallel.world_size() > 1 and parallel.launched_rank() != 0 and not exc.rank_specific:
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
    under torchrun without the interpreter's teardown (`parallel.exit_without_teardown`)."""
    code = main()
    from . import parallel

    if parallel.world_size() > 1:
        parallel.exit_without_teardown(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
