"""Selective checkpointing changes what is recomputed, never the gradients."""
import pytest
import torch
from peft import get_peft_model
from test_kernels_peft import assert_same, batch, lora_config, loss_logits_grads, tiny_thinker

from omnitune.kernels import enable_fast_lora
from omnitune.kernels.checkpointing import selective_checkpoint_context


@pytest.mark.parametrize("save_matmuls", [False, True])
def test_selective_checkpointing_gives_the_same_grads_as_no_checkpointing(save_matmuls):
    inputs = batch()
    model = get_peft_model(tiny_thinker("omnitune"), lora_config())
    model.set_attn_implementation("sdpa")
    enable_fast_lora(model)
    model.train()
    ref = loss_logits_grads(model, inputs)
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": selective_checkpoint_context(save_matmuls)})
    assert_same(loss_logits_grads(model, inputs), ref)
