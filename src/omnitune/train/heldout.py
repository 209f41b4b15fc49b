"""Held-out scores from the prepared eval split, with no generation loop.

Exact match is teacher-forced: a sample counts as correct when the argmax prediction equals the label at every
trained position (answer tokens and `<|im_end|>`). By induction that is exactly when greedy decoding would
reproduce every assistant turn verbatim, at the cost of one forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnitune.data.render import IGNORE
from omnitune.train.trainer import thinker_of


@torch.no_grad()
def heldout_scores(model: torch.nn.Module, dataset, collator, batch_size: int = 8) -> dict[str, float]:
    """{'loss': mean token CE, 'accuracy': greedy exact-match rate, 'samples': n} over `dataset`."""
    thinker = thinker_of(model)
    was_training = thinker.training
    thinker.eval()
    total_loss, total_tokens, correct, n = 0.0, 0, 0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        labels = batch.pop("labels")[:, 1:]
        batch.pop("sample_weight", None)
        logits = thinker(**batch).logits[:, :-1].float()
        trained = labels != IGNORE
        ce = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        total_loss += float((ce * trained).sum())
        total_tokens += int(trained.sum())
        correct += int(((logits.argmax(-1) == labels) | ~trained).all(dim=1).sum())
        n += labels.shape[0]
    thinker.train(was_training)
    return {"loss": total_loss / max(total_tokens, 1), "accuracy": correct / max(n, 1), "samples": n}
