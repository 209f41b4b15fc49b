"""Run under `torchrun --nproc_per_node 2`: by tests/test_ddp.py on the CPU (gloo), and on a 2-GPU machine (NCCL).
One OmniTrainer step on the tiny Thinker with LoRA, each process on different samples; writes every process's LoRA
gradient checksums (taken just before the optimizer step) to OUT/grads-<rank>.json. With `--bypass-ddp` the loss
skips the DDP wrapper the way omnitune's trainer did before it supported DDP (to show the check notices
unsynchronised gradients)."""
import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from omnitune.data.collate import OmniCollator
from omnitune.model.adapters import apply_adapters
from omnitune.model.load import load_thinker
from omnitune.recipe import load_recipe
from omnitune.train.objectives import ThinkerLM
from omnitune.train.trainer import OmniTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared helpers
from model_helpers import randomize_lora  # noqa: E402


class GradChecksums(TrainerCallback):
    def __init__(self, model, path):
        self.model, self.path = model, path

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        sums = {n: float(p.grad.double().sum()) for n, p in self.model.named_parameters()
                if p.requires_grad and p.grad is not None}
        with open(self.path, "w") as f:
            json.dump(sums, f)


def main() -> None:
    out, bypass = sys.argv[1], "--bypass-ddp" in sys.argv
    recipe = load_recipe("demo", ["adapter.targets=[attention,experts]", "adapter.train=[]"])  # every trainable
    # param gets a gradient
    torch.manual_seed(0)  # the same initial model in every process
    model = apply_adapters(load_thinker(recipe.model), recipe.adapter)
    randomize_lora(model, seed=0)
    g = torch.Generator().manual_seed(1)
    samples = []
    for _ in range(8):
        ids = torch.randint(10, 5000, (int(torch.randint(12, 40, (1,), generator=g)),), generator=g)
        samples.append(dict(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids),
                            modalities=["text"]))
    args = TrainingArguments(output_dir=os.path.join(out, "ckpt"), use_cpu=not torch.cuda.is_available(),
                             max_steps=1, per_device_train_batch_size=2, report_to=[], save_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True, ddp_find_unused_parameters=False)
    rank = int(os.environ["RANK"])
    objective = ThinkerLM()
    trainer = OmniTrainer(model=model, args=args, train_dataset=samples, objective=objective,
                          data_collator=OmniCollator(0, recipe.train.loss_weights),
                          callbacks=[GradChecksums(model, os.path.join(out, f"grads-{rank}.json"))])
    if bypass:
        trainer.compute_loss = lambda m, inputs, return_outputs=False, num_items_in_batch=None: objective.loss(
            trainer.accelerator.unwrap_model(m), inputs, num_items_in_batch)
    trainer.train()
    print(f"rank {rank}: backend {torch.distributed.get_backend()}, device {args.device}", flush=True)


if __name__ == "__main__":
    main()
