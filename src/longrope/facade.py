"""The seed's facade: a small language model whose context window one call extends.

    model = LongRoPEModel(d_model, n_heads, num_layers, base_length)
    model = model.extend_context(data, target_length)   # in place; returns the model itself
    output = model(input_ids)                           # logits (batch, length, vocab)

`extend_context` runs the progressive pipeline (`pipeline.extend`); what the run produced (its
folder, the final scaling, the measured report) is `model.last_extension`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from . import models, pipeline, runs, train
from . import scaling as sc
from .data import Document, TokenizedDocument, load_tokenized, special_tokens_added, tokenize_text
from .errors import UsageError
from .search import SearchConfig
from .tokenization import byte_tokenizer

# pretrain's options, as PretrainConfig's messages name them -> the facade's argument names
OPTION_NAMES = {"--context": "base_length", "--layers": "num_layers", "--heads": "n_heads",
                "--kv-heads": "n_kv_heads", "--d-model": "d_model"}


class LongRoPEModel(torch.nn.Module):
    """A small Llama-architecture language model (transformers' LlamaForCausalLM, the byte-level
    tokenizer of `longrope.tokenization`, head_dim = d_model // n_heads) whose context window
    `extend_context` extends with the progressive LongRoPE pipeline.

    ``model(input_ids)`` takes a (batch, seq) LongTensor of token ids and returns the logits, a
    float tensor (batch, seq, vocab). The model starts randomly initialised (seeded): train it
    (`longrope.train`) or load weights into `model.hf_model` to make the numbers mean something.
    """

    def __init__(self, d_model: int = 256, n_heads: int = 4, num_layers: int = 4, base_length: int = 256, *,
                 n_kv_heads: int | None = None, intermediate_size: int | None = None, rope_theta: float = 10000.0,
                 seed: int = 0):
        super().__init__()
        if d_model < 2 or n_heads < 1 or d_model % n_heads or (d_model // n_heads) % 2:
            raise UsageError(f"LongRoPEModel: d_model ({d_model}) must be a multiple of n_heads ({n_heads}) with an "
                             "even head_dim (RoPE rotates pairs)")
        cfg = train.PretrainConfig(context=base_length, d_model=d_model, layers=num_layers, heads=n_heads,
                                   kv_heads=n_kv_heads or n_heads, head_dim=d_model // n_heads,
                                   intermediate_size=intermediate_size, rope_theta=rope_theta, seed=seed,
                                   passkey_share=0.0)
        try:
            cfg.validate()
        except UsageError as exc:  # its messages name pretrain's options
            message = str(exc)
            for option, name in OPTION_NAMES.items():
                message = message.replace(option + " ", name + " ")
            raise UsageError(f"LongRoPEModel: {message}") from None
        self.hf_model = train.build_model(cfg).eval()
        self.tokenizer = byte_tokenizer()
        self.base_length = base_length
        self.max_length = base_length
        self.scaling: sc.Scaling | None = None
        self.workdir: Path | None = None
        self.last_extension: pipeline.ExtendResult | None = None  # what the last extend_context produced

    @classmethod
    def from_pretrained(cls, spec: str | os.PathLike, device: str = "cpu") -> "LongRoPEModel":
        """Wrap an existing model (an HF folder, .gguf or named model) instead of a fresh one."""
        model, tokenizer = models.load(str(spec), device=device)
        info = models.rope_info(model.config)
        self = cls.__new__(cls)
        torch.nn.Module.__init__(self)
        self.hf_model, self.tokenizer = model, tokenizer
        self.base_length = self.max_length = info.original_length
        self.scaling, self.workdir, self.last_extension = models.attached_scaling(model), None, None
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.hf_model.get_output_embeddings().weight.device)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        return self.hf_model(input_ids=ids, use_cache=False).logits

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.tokenizer(text)["input_ids"]])

    def extend_context(self, data, target_length: int | str, *, stages: str | None = None,
                       out: str | os.PathLike | None = None, finetune_steps: int = 0, samples: int = 2,
                       search: SearchConfig | None = None, readjust: bool = True,
                       report_lengths: Sequence[int] | None = None, device: str = "cpu", resume: bool = False,
                       seed: int = 0, log: Callable[[str], None] = print,
                       progress: pipeline.ProgressHooks | None = None,
                       render_report: Callable[[Path, dict], None] | None = None) -> "LongRoPEModel":
        """Extend the context window to `target_length` tokens with the progressive pipeline, in
        place: the model then carries the final scaling (and fine-tuned weights), and this returns
        the model itself (``model = model.extend_context(data, L)``). What the run produced (its
        folder, scaling, checkpoint and measured report) is `self.last_extension`.

        `data`: a path (.txt/.md, folder, .jsonl(.gz), .parquet), "bundled", or a list of texts.
        `stages` default: ``search:TARGET``; with `finetune_steps` > 0, LongRoPE's progressive
        recipe in small: ``search:HALF,finetune:HALF:STEPS,search:TARGET`` (HALF = TARGET/2 when
        that is above the base length, else TARGET). Small search budget by default
        (population 16, 4 generations). Outputs go to `out` (default: a new temporary folder,
        kept in `self.workdir`). `progress`: how to show it (`pipeline.ProgressHooks`; default
        none); `render_report(out, report)`: also write report.md and report.png
        (`longrope.report.write_extend_report`)."""
        target = pipeline.parse_length(target_length) if isinstance(target_length, str) else int(target_length)
        if target <= self.base_length:
            raise UsageError(f"target_length {target} must be above the model's context {self.base_length}")
        if stages is None:
            half = target // 2
            mid = half if half > self.base_length else target
            stages = (f"search:{mid},finetune:{mid}:{finetune_steps},search:{target}" if finetune_steps > 0
                      else f"search:{target}")
        plan = pipeline.parse_stages(stages)
        workdir = (runs.open_dir(out, resume=resume, command="extend_context") if out is not None
                   else Path(tempfile.mkdtemp(prefix="longrope-extend-")))
        self.workdir = workdir
        base = workdir / "base-model"
        if not (resume and (base / "config.json").is_file()):
            hf_logging.disable_progress_bar()
            shutil.rmtree(base, ignore_errors=True)
            self.hf_model.save_pretrained(base)
            self.tokenizer.save_pretrained(base)
        config = pipeline.PipelineConfig(
            target_length=target, stages=plan, samples=samples,
            search=search or SearchConfig(population=16, mutations=4, crossovers=4, parents=8, generations=4,
                                            seed=seed),
            finetune=train.FinetuneConfig(seq_len=2, steps=max(1, finetune_steps), lr=1e-4, checkpoint_every=50,
                                          log_every=10, device=device),
            readjust=readjust, report_lengths=tuple(report_lengths) if report_lengths else None,
            seed=seed, device=device)
        result = pipeline.extend(str(base), self.tokenizer, self._documents(data), config, workdir / "run",
                                 resume=resume, log=log, progress=progress, render_report=render_report)
        model, _ = models.load(str(result.model_dir), device=device)
        models.attach(model, result.scaling)
        self.hf_model, self.scaling, self.max_length = model, result.scaling, target
        self.last_extension = result
        return self

    def _documents(self, data) -> list[TokenizedDocument]:
        if isinstance(data, (str, os.PathLike)):
            return load_tokenized(data, self.tokenizer)
        texts = list(data)
        if not texts:
            raise UsageError("data: no documents")
        specials = special_tokens_added(self.tokenizer)
        docs = []
        for i, item in enumerate(texts):
            doc_id, text = (item.id, item.text) if isinstance(item, Document) else (f"doc{i}", str(item))
            docs.append(TokenizedDocument(doc_id, np.asarray(tokenize_text(self.tokenizer, text, specials=specials),
                                                               dtype=np.int64)))
        return docs

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Export the model (with its scaling, if extended) as a Hugging Face checkpoint."""
        scaling = self.scaling or sc.NoScaling()
        return models.export(self.hf_model, self.tokenizer, scaling, path, force=force)
