"""(issue 5) Is SmolLM2-135M-Instruct's passkey score a prompt artefact? The standard passkey
prompt (`longrope eval passkey`: instruction, filler, needle, filler, "What is the pass key? The
pass key is") against the same text in the model's chat template (the text up to the question as
the user turn, "What is the pass key?" ending it, the assistant turn opened with "The pass key
is"), same keys, same depths, no scaling (inside the trained window). Runs on the CPU.

    python bench/smollm2_passkey_format.py smollm2-135m --lengths 4k,8k --out passkey-format.json
"""

from __future__ import annotations

import argparse
import random
import time

from _common import environment, write_json
from longrope import evaluate as E
from longrope import models
from longrope.cli import parse_length


def chat_prompt(tokenizer, prompt: E.PasskeyPrompt) -> list[int]:
    body = prompt.text[:-len(E.PASSKEY_QUESTION)].rstrip()
    text = tokenizer.apply_chat_template([{"role": "user", "content": body + " What is the pass key?"}],
                                         tokenize=False, add_generation_prompt=True) + "The pass key is"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="smollm2-135m or a SmolLM2 GGUF path")
    p.add_argument("--lengths", default="4k,8k")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,0.9,1")
    p.add_argument("--trials", type=int, default=2, help="keys per depth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="passkey-format.json")
    args = p.parse_args()
    model, tokenizer = models.load(args.model)
    model.eval()
    rng = random.Random(args.seed)
    rows = []
    for length in [parse_length(x) for x in args.lengths.split(",")]:
        for depth in [float(x) for x in args.depths.split(",")]:
            for _ in range(args.trials):
                key = E.random_key(rng)
                prompt = E.passkey_prompt(tokenizer, length, depth, key)
                t0 = time.perf_counter()
                standard = E.passkey_trial(model, tokenizer, prompt)
                ids = chat_prompt(tokenizer, prompt)
                answer = tokenizer.decode(E.greedy_generate(model, ids, 10, eos_token_id=tokenizer.eos_token_id))
                row = {"length": length, "depth": depth, "key": key, "standard_correct": standard.correct,
                       "standard_answer": standard.answer, "standard_tokens": len(prompt.input_ids),
                       "chat_correct": E.passkey_correct(answer, key), "chat_answer": answer, "chat_tokens": len(ids),
                       "seconds": round(time.perf_counter() - t0, 2)}
                rows.append(row)
                print(f"{length:>6} depth {depth:<4} key {key}: standard {'ok' if standard.correct else 'miss':4} "
                      f"{standard.answer!r:40} chat {'ok' if row['chat_correct'] else 'miss':4} {answer!r}", flush=True)
                write_json(args.out, {"benchmark": "smollm2_passkey_format", "model": args.model, "rows": rows,
                                      "environment": environment()})
    for length in sorted({r["length"] for r in rows}):
        mine = [r for r in rows if r["length"] == length]
        print(f"{length:>6}: standard {sum(r['standard_correct'] for r in mine)}/{len(mine)}, "
              f"chat {sum(r['chat_correct'] for r in mine)}/{len(mine)}")


if __name__ == "__main__":
    main()
