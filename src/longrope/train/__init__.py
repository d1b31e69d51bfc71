"""Training: pretraining the small bundled base model (`pretrain`) and long-context fine-tuning of a
scaled model (`finetune`), on one machinery (`loop`: configuration, AdamW and its schedule,
checkpoints and exact resume, the step log, the finished-run record). Fine-tuning runs in one
process or, under torchrun, context parallel with FSDP2 (`parallel`).

    from longrope import train
    train.pretrain(train.PretrainConfig(steps=100), documents, "out")
    train.finetune(model, tokenizer, scaling, packed, train.FinetuneConfig(seq_len=8192, steps=400), "ft")
"""

from . import loop, parallel, retention
from .finetune import (FT_RECORD, FinetuneConfig, FinetuneResult, default_lr, finetune, finetune_batch, pack_documents,
                       pick_source)
from .loop import CHECKPOINT, LOG, SAVE_DTYPES, StepInfo, TrainConfig, lr_at
from .parallel import chunked_lm_loss
from .pretrain import (PRETRAIN_RECORD, PretrainConfig, PretrainResult, build_model, llama_config, lm_loss,
                       make_batch, parameter_count, pretrain, token_stream)

__all__ = [
    "CHECKPOINT", "FT_RECORD", "LOG", "PRETRAIN_RECORD", "SAVE_DTYPES", "FinetuneConfig", "FinetuneResult",
    "PretrainConfig", "PretrainResult", "StepInfo", "TrainConfig", "build_model", "chunked_lm_loss", "default_lr",
    "finetune", "finetune_batch", "llama_config", "lm_loss", "loop", "lr_at", "make_batch", "pack_documents",
    "parallel", "parameter_count", "pretrain", "retention", "token_stream",
]
