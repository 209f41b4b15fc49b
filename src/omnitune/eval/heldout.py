"""Held-out scores from the prepared eval split, with no generation loop.

Exact match is teacher-forced: a sample counts as correct when the argmax prediction equals the label at every
trained position (answer tokens and `<|im_end|>`). By induction that is exactly when greedy decoding would
reproduce every assistant turn verbatim, at the cost of one forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnitune.data.collate import to_device
from omnitune.model import parts
from omnitune.train.loss import trained_logits


@torch.no_grad()
def heldout_scores(model: torch.nn.Module, dataset, collator, batch_size: int = 8) -> dict[str, float]:
    """{'loss': mean token CE, 'accuracy': greedy exact-match rate, 'samples': n} over `dataset`."""
    thinker = parts.thinker_of(model)
    device = next(thinker.parameters()).device
    was_training = thinker.training
    thinker.eval()
    total_loss, total_tokens, correct, n = 0.0, 0, 0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        labels = batch.pop("labels")
        batch.pop("sample_weight", None)
        hidden = thinker.model(**to_device(batch, device, thinker.dtype), use_cache=False).last_hidden_state
        logits, targets, rows = trained_logits(hidden, thinker.lm_head, labels)
        total_loss += float(F.cross_entropy(logits, targets, reduction="sum"))
        total_tokens += int(targets.numel())
        wrong = torch.zeros(labels.shape[0], dtype=torch.bool, device=rows.device)
        wrong[rows[logits.argmax(-1) != targets]] = True
        correct += int((~wrong).sum())
        n += labels.shape[0]
    thinker.train(was_training)
    return {"loss": total_loss / max(total_tokens, 1), "accuracy": correct / max(n, 1), "samples": n}
