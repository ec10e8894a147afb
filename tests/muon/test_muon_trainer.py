"""``TrainingArguments(optim="muon")`` through ``Trainer``: loss falls, checkpoint resume is exact, bad optim_args
error, and the ``OptimizerNames`` patch in hf_effllm.compat is idempotent."""

from __future__ import annotations

import pickle

import pytest
import torch
from transformers import Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

import hf_effllm  # noqa: F401  (registers optim="muon")
from hf_effllm.compat import add_optimizer_name
from hf_effllm.errors import HfEffllmError
from hf_effllm.optim import Muon
from hf_effllm.optim.muon import register_trainer_optimizer
from hf_effllm.testing import tiny_model


def _data(n: int = 32, seq: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    # A learnable pattern: each sequence repeats a short random motif.
    rows = []
    for _ in range(n):
        motif = torch.randint(0, 64, (4,), generator=g)
        ids = motif.repeat(seq // 4)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        optim="muon",
        learning_rate=2e-2,
        per_device_train_batch_size=8,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        logging_steps=1,
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def test_optimizer_name_patch_is_idempotent():
    member = OptimizerNames("muon")
    assert member is OptimizerNames.MUON and member in list(OptimizerNames)
    assert add_optimizer_name("muon") is member
    assert add_optimizer_name("adamw_torch") is OptimizerNames.ADAMW_TORCH
    assert pickle.loads(pickle.dumps(member)) is member
    assert register_trainer_optimizer() == "muon"
    assert register_trainer_optimizer() == "muon"
    assert TrainingArguments("x", optim="muon").to_dict()["optim"] == "muon"


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("qwen3_moe", {"gradient_accumulation_steps": 2, "lr_scheduler_type": "cosine", "warmup_steps": 2}),
        ("llama", {"bf16": True, "weight_decay": 0.1, "optim_args": "momentum=0.9,adjust_lr=original,adamw_lr=3e-3"}),
    ],
)
def test_loss_falls_through_trainer(tmp_path, model_type, extra):
    model = tiny_model(model_type).train()
    args = _args(tmp_path, max_steps=12, **extra)
    trainer = Trainer(model=model, args=args, train_dataset=_data())
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(inner, Muon)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses[-1] < 0.85 * losses[0], losses
    if "optim_args" in extra:
        assert inner.config.momentum == 0.9 and inner.config.adjust_lr == "original"
        assert {g["initial_lr"] for g in inner.param_groups if not g["use_muon"]} == {3e-3}
        assert {g["initial_lr"] for g in inner.param_groups if g["use_muon"]} == {2e-2}


def test_checkpoint_resume_continues_identically(tmp_path):
    # llama: transformers 5.24's Trainer resume does not convert stacked MoE expert weights back from the per-expert
    # checkpoint format (it warns "missing keys"), so a MoE model cannot resume exactly through Trainer today.
    data = _data()
    common = dict(max_steps=6, lr_scheduler_type="linear", weight_decay=0.05, save_strategy="steps", save_steps=3)

    def run(folder, resume=None):
        trainer = Trainer(model=tiny_model("llama").train(), args=_args(folder, **common), train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return [p.detach().clone() for p in trainer.model.parameters()]

    straight = run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-3"
    resumed = run(tmp_path / "b", str(checkpoint))
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    state = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    kinds = {frozenset(s) for s in state["state"].values()}
    assert kinds == {frozenset({"momentum_buffer"}), frozenset({"step", "exp_avg", "exp_avg_sq"})}
    # Without the optimizer state the continuation differs, so the comparison above can fail.
    (checkpoint / "optimizer.pt").unlink()
    without_state = run(tmp_path / "c", str(checkpoint))
    assert not all(torch.equal(a, b) for a, b in zip(straight, without_state))


def test_bad_optim_args_error_through_trainer(tmp_path):
    trainer = Trainer(
        model=tiny_model("llama"), args=_args(tmp_path, max_steps=1, optim_args="momentun=0.9"), train_dataset=_data()
    )
    with pytest.raises(HfEffllmError, match="unknown key"):
        trainer.train()
