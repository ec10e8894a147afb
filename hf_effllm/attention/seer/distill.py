"""Gate distillation (post-training): the base model is frozen, only the gates learn, on ``transformers.Trainer``.

For each training window the frozen model runs once with ``distill`` attention: every layer computes its attention
output together with the block map of ``config.target`` (never the dense map: the block-max kernel for the paper's
``"max"``, a chunked computation for the default ``"mass"``, see :mod:`.targets`) and records the pooled pre-RoPE Q/K
and the target (that map reduced over the KV group by ``config.target_group_reduce``, normalised per block row). The
loss is the KL divergence between target and gate distribution, per block row, averaged over rows, heads and layers
(``distill_forced_blocks=False`` leaves out the blocks that are kept anyway). Because the target does not depend on the
gates, the records of a window can be cached (``cache_features=True``): later epochs over the same windows skip the
base model entirely, which makes short CPU runs (the quickstart) cheap.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...errors import HfEffllmError
from .apply import gates_of
from .attention import distill_loss


@dataclass
class DistillResult:
    """What :func:`distill_gates` returns."""

    losses: list[float] = field(default_factory=list)
    final_loss: float = float("nan")
    steps: int = 0
    seconds: float = 0.0
    log_history: list[dict[str, Any]] = field(default_factory=list)


class GateDistillModel(nn.Module):
    """The module the Trainer trains: runs the frozen model in ``distill`` mode and returns the gate loss.

    ``state_dict`` holds only the gate parameters, so Trainer checkpoints stay small and resume works.
    """

    def __init__(self, model: nn.Module, *, cache_features: bool = True) -> None:
        super().__init__()
        self.model = model
        self.cache: dict[int, dict[int, dict[str, torch.Tensor]]] | None = {} if cache_features else None

    def train(self, mode: bool = True) -> GateDistillModel:
        super().train(mode)
        self.model.eval()  # targets come from the model as used at inference (no dropout)
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        full = super().state_dict(*args, **kwargs)
        return type(full)((k, v) for k, v in full.items() if ".seer_gate." in k)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        missing = [k for k in super().state_dict() if ".seer_gate." in k and k not in state_dict]
        if strict and missing:
            raise HfEffllmError(f"gate checkpoint lacks {missing[:4]}...; it is not from this model.")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def _records(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> dict[int, dict[str, torch.Tensor]]:
        gates = gates_of(self.model)
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model
        for g in gates.values():
            g.mode = "distill"
        try:
            with torch.no_grad():
                decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for g in gates.values():
                g.mode = "sparse"
        records = {}
        for i, g in gates.items():
            if g.distill_record is None:
                raise HfEffllmError(
                    f"layer {i} recorded no distillation target; sequences must have > 1 token and the model must "
                    "run seer_attention (apply_seer_attention)."
                )
            records[i], g.distill_record = g.distill_record, None
        return records

    def forward(
        self,
        input_ids: torch.Tensor,
        sample_id: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        ids = sample_id.tolist() if (self.cache is not None and sample_id is not None) else None
        if ids is not None and all(i in self.cache for i in ids):
            layers = self.cache[ids[0]].keys()
            records = {
                layer: {k: torch.cat([self.cache[i][layer][k] for i in ids]) for k in self.cache[ids[0]][layer]}
                for layer in layers
            }
        else:
            records = self._records(input_ids, attention_mask)
            if ids is not None:
                for j, i in enumerate(ids):
                    self.cache[i] = {layer: {k: v[j : j + 1] for k, v in rec.items()} for layer, rec in records.items()}
        gates = gates_of(self.model)
        loss = torch.stack([distill_loss(gates[i], rec) for i, rec in records.items()]).mean()
        return {"loss": loss}


class _Windows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "sample_id": torch.tensor(i)}


def _collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _windows(data: Any, tokenizer: Any, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    from ...data import calibration_batches

    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype not in (torch.int64, torch.int32):
            raise HfEffllmError(
                f"data tensor must be integer token ids (N, seq); got {data.dtype} {tuple(data.shape)}."
            )
        return data.long()
    if data is not None and hasattr(data, "column_names") and "input_ids" in data.column_names:
        rows = [list(r) for r in data["input_ids"]]
        lengths = sorted({len(r) for r in rows})
        if len(lengths) != 1:
            raise HfEffllmError(
                f"data['input_ids'] rows have lengths {lengths[:6]}; distillation windows must all have one length "
                "(give a `text` column instead, or cut the rows to equal windows)."
            )
        return torch.tensor(rows, dtype=torch.long)
    if tokenizer is None:
        from ...data import load_tokenizer

        tokenizer = load_tokenizer()
    return calibration_batches(tokenizer, nsamples=nsamples, seqlen=seqlen, texts=data, seed=seed)


def distill_gates(
    model: nn.Module,
    data: Any = None,
    *,
    tokenizer: Any = None,
    nsamples: int = 16,
    seqlen: int = 2048,
    max_steps: int = 100,
    learning_rate: float = 1e-3,
    batch_size: int = 1,
    gradient_accumulation_steps: int = 1,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    lr_scheduler_type: str = "cosine",
    output_dir: str | None = None,
    cache_features: bool = True,
    logging_steps: int = 10,
    seed: int = 0,
    training_args: Any = None,
    callbacks: list[Any] | None = None,
) -> DistillResult:
    """Distil the SeerAttention gates of ``model`` (base weights frozen) with ``transformers.Trainer``.

    Works under ``torchrun``/Accelerate (DDP: each rank sees its share of the windows; gradients of the gates are
    averaged). Only gate parameters are trainable and only they are checkpointed.

    Args:
        model: a model set up with :func:`apply_seer_attention`.
        data: None (the corpus's training split), text(s), a ``datasets.Dataset`` with ``text`` or ``input_ids``,
            or a LongTensor ``(N, seq)`` of token windows.
        tokenizer: the model's tokenizer (needed for text; default the embedded model's).
        nsamples: windows drawn from text data.
        seqlen: tokens per window (text data).
        max_steps: optimizer steps.
        learning_rate: AdamW learning rate.
        batch_size: windows per device per step.
        gradient_accumulation_steps: micro-batches per optimizer step.
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay.
        lr_scheduler_type: any transformers scheduler name.
        output_dir: Trainer folder for logs/checkpoints (default: a temporary folder, no checkpoints).
        cache_features: reuse each window's recorded targets in later epochs instead of re-running the model.
        logging_steps: Trainer logging interval.
        seed: Trainer seed (data order, same on every rank).
        training_args: a full ``TrainingArguments`` instead of the arguments above (``remove_unused_columns`` is
            forced to False).
        callbacks: extra ``TrainerCallback`` objects.

    Returns:
        :class:`DistillResult` with the logged losses.

    Example:
        >>> hf_effllm.apply_seer_attention(model)  # doctest: +SKIP
        >>> hf_effllm.seer.distill_gates(model, nsamples=8, seqlen=1024, max_steps=40)  # doctest: +SKIP
    """
    from transformers import Trainer, TrainingArguments

    gates = gates_of(model)
    if not gates:
        raise HfEffllmError("model has no SeerAttention gates; call hf_effllm.apply_seer_attention(model) first.")
    for name, value in (
        ("max_steps", max_steps),
        ("batch_size", batch_size),
        ("nsamples", nsamples),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
    ):
        if not isinstance(value, int) or value < 1:
            raise HfEffllmError(f"{name}={value!r} must be an integer >= 1.")
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
        raise HfEffllmError(f"learning_rate={learning_rate!r} must be a positive number.")
    ids = _windows(data, tokenizer, nsamples, seqlen, seed)
    if ids.shape[1] < 2:
        raise HfEffllmError(f"windows of {ids.shape[1]} token(s) are too short to distil; use seqlen >= 2.")
    tmp = None
    if training_args is None:
        if output_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="seer_distill_")
        training_args = TrainingArguments(
            output_dir=output_dir or tmp.name,
            max_steps=max_steps,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            learning_rate=learning_rate,
            warmup_steps=warmup_steps,
            weight_decay=weight_decay,
            lr_scheduler_type=lr_scheduler_type,
            logging_steps=logging_steps,
            save_strategy="no" if output_dir is None else "steps",
            report_to="none",
            seed=seed,
            data_seed=seed,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
    training_args.remove_unused_columns = False
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    for n, p in model.named_parameters():
        p.requires_grad_(".seer_gate." in n)
    wrapper = GateDistillModel(model, cache_features=cache_features)
    t0 = time.perf_counter()
    try:
        trainer = Trainer(
            model=wrapper,
            args=training_args,
            train_dataset=_Windows(ids),
            data_collator=_collate,
            callbacks=callbacks,
        )
        trainer.train()
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(requires.get(n, True))
        model.train(was_training)
        for g in gates_of(model).values():
            g.mode, g.distill_record = "sparse", None
        if tmp is not None:
            tmp.cleanup()
    history = list(trainer.state.log_history)
    losses = [float(h["loss"]) for h in history if "loss" in h]
    return DistillResult(
        losses=losses,
        final_loss=losses[-1] if losses else float("nan"),
        steps=int(trainer.state.global_step),
        seconds=time.perf_counter() - t0,
        log_history=history,
    )
