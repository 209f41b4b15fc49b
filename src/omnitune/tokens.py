"""Token-level conventions that data, losses, kernels and generation must agree on, defined once.

`IGNORE_INDEX`: the label of a position that is not trained (prompts, padding, media placeholders); the value
PyTorch's cross-entropy and transformers' losses skip. `pad_id(tokenizer)`: the token batches are padded with;
Qwen3's tokenizer may have none, and then `<|im_end|>` pads, as the released generation config does.
"""
from __future__ import annotations

IGNORE_INDEX = -100
IM_END = "<|im_end|>"


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token id, or `<|im_end|>`'s when it has none."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.convert_tokens_to_ids(IM_END))
