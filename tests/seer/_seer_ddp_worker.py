"""Gate distillation run for the DDP test: ``torchrun --nproc_per_node 2`` (gloo) or a single process.

Usage: python _seer_ddp_worker.py OUT_FILE PER_DEVICE_BATCH
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch


def main() -> None:
    out_file, batch = sys.argv[1], int(sys.argv[2])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import TrainingArguments

    from hf_effllm import SeerAttentionConfig, apply_seer_attention, seer
    from hf_effllm.testing import tiny_model

    torch.manual_seed(0)
    model = apply_seer_attention(tiny_model("llama"), SeerAttentionConfig(block_size=16, gate_hidden_size=16))
    # Attention of a random tiny model is almost uniform; sharper queries give the gates something to learn.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=3,
            per_device_train_batch_size=batch,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            train_sampling_strategy="sequential",
            save_strategy="no",
            report_to="none",
            logging_steps=1,
            seed=0,
            use_cpu=True,
            disable_tqdm=True,
            ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
            ddp_timeout=120,
        )
        res = seer.distill_gates(model, ids, training_args=args, cache_features=False)
    if int(os.environ.get("RANK", "0")) == 0:
        state = {
            f"{i}.{n}": p.detach().clone() for i, g in seer.gates_of(model).items() for n, p in g.named_parameters()
        }
        torch.save({"state": state, "losses": res.losses}, out_file)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from hf_effllm.testing import end_gloo_worker

        end_gloo_worker()  # not the interpreter's teardown of the process group: see its docstring


if __name__ == "__main__":
    main()
