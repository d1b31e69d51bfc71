"""Issue 17: what an exported LongRoPE model gives in plain transformers, short and long.

Each scaling is exported with `longrope export` and loaded back with transformers alone
(`AutoModelForCausalLM.from_pretrained`: its own `longrope` RoPE, which picks the short factors up
to the original length and the long ones beyond, with one attention factor for both). Perplexity
(first L tokens of each document, transformers' modules, only the final projection chunked) at:
- 4k and 8k, beside the base model without scaling;
- 8k with the long factors: what vLLM serves every prompt once its max length passes the original;
- the scaling's target length;
- the curve: 8k against the target length as the shared attention factor varies (--temperatures).

    python bench/short_context_exports.py --model BASE --data report_prose.jsonl.gz report_code.jsonl.gz \\
        --docs 5,4 --scalings smollm2-135m-64k,smollm2-135m-128k --temperatures 1,1.05,1.1094,1.1435,1.2 \\
        --out short_context_exports.json
    LONGROPE_BENCH_SMOKE=1 python bench/short_context_exports.py --model src/longrope/bundled/tiny-llama-256 --data bundled --docs 2 \\
        --scalings S.json --short 128,256 --out /tmp/x.json       # a CPU check of the script
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from _common import SMOKE, environment, write_json
from longrope import data, models
from longrope import scaling as sc
from longrope.cli import parse_lengths
from longrope import evaluate

DEVICE = "cpu" if SMOKE or not torch.cuda.is_available() else "cuda"
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16


def plain(folder: str, **rope_overrides):
    """The folder loaded by transformers alone, its rope_parameters changed by `rope_overrides`."""
    config = AutoConfig.from_pretrained(folder)
    if rope_overrides:
        config.rope_parameters = {**config.rope_parameters, **rope_overrides}
    return AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=DTYPE,
                                                attn_implementation="sdpa").to(DEVICE).eval()


def ppl(model, sets: dict, length: int) -> dict:
    """Token-weighted perplexity of the first `length` tokens of every document, per set."""
    out = {}
    for name, docs in sets.items():
        total = count = 0
        for doc in docs:
            nll, n = evaluate.nll_sum(model, torch.as_tensor(doc.tokens[:length]), forward="modules")
            total, count = total + nll, count + n
        out[name] = round(evaluate.perplexity_from(total, count), 4)
    return out


def export(model: str, scaling: str, out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "longrope", "export", "--model", model, "--scaling", scaling,
                    "--out", str(out), "--device", "cpu"], check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "config.json").read_text())["rope_parameters"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the base model (HF folder or .gguf)")
    p.add_argument("--data", nargs="+", required=True, help="held-apart document sets, one table column each")
    p.add_argument("--docs", default="4", help="documents per set, comma-separated per --data (default 4)")
    p.add_argument("--scalings", default="", help="comma-separated LongRoPE scaling files or presets")
    p.add_argument("--exported", default="", help="comma-separated model folders already exported with a LongRoPE "
                                                  "scaling (e.g. `longrope finetune`'s output), measured as they are")
    p.add_argument("--short", type=parse_lengths, default=parse_lengths("4k,8k"),
                   help="lengths inside the original window (default 4k,8k; the last is the curve's)")
    p.add_argument("--temperatures", default="", help="shared attention factors of the curve ('' for none)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    tokenizer = models.load_tokenizer(args.model)
    info = models.rope_info(models.load_config(args.model))
    scalings = {s: sc.load(sc.preset_path(s), info.dim) for s in args.scalings.split(",") if s}
    exported = {f: models.configured_scaling(f) for f in args.exported.split(",") if f}
    if not scalings and not exported:
        p.error("give --scalings or --exported")
    longest = max(s.target_length for s in (*scalings.values(), *exported.values()))
    counts = [int(n) for n in args.docs.split(",")]
    counts += counts[-1:] * (len(args.data) - len(counts))
    sets = {Path(source).name.split(".")[0]: data.select(data.load_tokenized(source, tokenizer), longest, n, seed=0)
            for source, n in zip(args.data, counts)}
    for (name, docs), wanted in zip(sets.items(), counts):
        if len(docs) < wanted:  # data.select keeps those long enough
            print(f"note: {name}: {len(docs)} of the {wanted} documents asked for have {longest} tokens")
    result = {"environment": environment(), "documents": {k: [d.id for d in v] for k, v in sets.items()},
              "base": {}, "scalings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"  # the model as transformers saves it: what every export starts from
        models.load(args.model, dtype=torch.float32)[0].save_pretrained(base)
        tokenizer.save_pretrained(base)
        model = plain(str(base))
        for n in args.short:
            result["base"][n] = ppl(model, sets, n)
        print(f"base: {result['base']}", flush=True)
        for name, scaling in [*scalings.items(), *exported.items()]:
            if name in exported:
                folder = Path(name)
                rope = json.loads((folder / "config.json").read_text())["rope_parameters"]
            else:
                folder = Path(tmp) / f"export-{len(result['scalings'])}"
                rope = export(str(base), name, folder)
            row = {"target_length": scaling.target_length, "attention_factor": rope.get("attention_factor"),
                   "short_factor": rope["short_factor"]}
            model = plain(str(folder))
            row["short"] = {n: ppl(model, sets, n) for n in args.short}
            row["target"] = ppl(model, sets, scaling.target_length)
            row["served_long"] = ppl(plain(str(folder), short_factor=rope["long_factor"]), sets, args.short[-1])
            row["curve"] = []
            for t in [float(x) for x in args.temperatures.split(",") if x]:
                model = plain(str(folder), attention_factor=t)
                row["curve"].append({"attention_factor": t, "short": ppl(model, sets, args.short[-1]),
                                     "target": ppl(model, sets, scaling.target_length)})
                print(f"{name}: attention factor {t:g}: {row['curve'][-1]}", flush=True)
            row["short_vs_base"] = {n: {k: round(v / result["base"][n][k], 4) for k, v in row["short"][n].items()}
                                    for n in args.short}
            result["scalings"][name] = row
            print(f"{name}: {json.dumps({k: row[k] for k in ('short', 'target', 'served_long', 'short_vs_base')})}",
                  flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
