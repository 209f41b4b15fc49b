"""Selective checkpointing changes what is recomputed, never the gradients."""
import pytest
import torch
from peft import get_peft_model
from test_kernels_peft import assert_same, batch, lora_config, loss_logits_grads, tiny_thinker

from omnitune.kernels import enable_fast_lora
from omnitune.kernels.checkpointing import decoder_layers, keep_activations, selective_checkpoint_context


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


def test_the_last_layers_can_skip_checkpointing_with_the_same_grads():
    inputs = batch()
    model = get_peft_model(tiny_thinker("omnitune"), lora_config())
    enable_fast_lora(model)
    model.train()
    ref = loss_logits_grads(model, inputs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    assert len(layers) >= 2 and all(layer.gradient_checkpointing for layer in layers)
    assert keep_activations(model, 1) == len(layers) - 1
    assert [layer.gradient_checkpointing for layer in layers] == [True] * (len(layers) - 1) + [False]
    assert_same(loss_logits_grads(model, inputs), ref)
    with pytest.raises(ValueError, match=">= 0"):
        keep_activations(model, -1)


def test_the_trainer_takes_checkpointing_off_the_last_layers_after_switching_it_on(tmp_path):
    from transformers import TrainingArguments

    from omnitune.data.collate import OmniCollator
    from omnitune.train.trainer import KeepActivations, OmniTrainer

    model = get_peft_model(tiny_thinker("omnitune"), lora_config())
    samples = [dict(input_ids=i, labels=i.clone(), attention_mask=torch.ones_like(i), modalities=["text"])
               for i in batch()["input_ids"]]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=1, per_device_train_batch_size=2,
                             report_to=[], save_strategy="no", remove_unused_columns=False, disable_tqdm=True,
                             activation_checkpointing=True,
                             activation_checkpointing_kwargs={"use_reentrant": False})
    trainer = OmniTrainer(model=model, args=args, train_dataset=samples, callbacks=[KeepActivations(2)],
                          data_collator=OmniCollator(0, {"text": 1.0, "audio": 1.0, "vision": 1.0}))
    trainer.train()
    flags = [layer.gradient_checkpointing for layer in decoder_layers(model)]
    assert flags == [True] * (len(flags) - 2) + [False, False]
