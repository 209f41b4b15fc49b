"""Selective checkpointing changes what is recomputed, never the gradients."""
import pytest
import torch
from peft import get_peft_model
from model_helpers import assert_same, batch, lora_config, loss_logits_grads, tiny_thinker

from omnitune.kernels import enable_fast_lora
from omnitune.model.parts import decoder_layers
from omnitune.train.checkpointing import keep_activations, selective_checkpoint_context


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


def _train_one_checkpointed_step(tmp_path, keep):
    """One OmniTrainer step on CPU with checkpointing switched on by the Trainer and KeepActivations(keep)."""
    from transformers import TrainingArguments

    from omnitune.data.collate import OmniCollator
    from omnitune.train.callbacks import KeepActivations
    from omnitune.train.objectives import ThinkerLM
    from omnitune.train.trainer import OmniTrainer

    model = get_peft_model(tiny_thinker("omnitune"), lora_config())
    samples = [dict(input_ids=i, labels=i.clone(), attention_mask=torch.ones_like(i), modalities=["text"])
               for i in batch()["input_ids"]]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=1, per_device_train_batch_size=2,
                             report_to=[], save_strategy="no", remove_unused_columns=False, disable_tqdm=True,
                             activation_checkpointing=True,
                             activation_checkpointing_kwargs={"use_reentrant": False})
    trainer = OmniTrainer(model=model, args=args, train_dataset=samples, callbacks=[KeepActivations(keep, 24)],
                          objective=ThinkerLM(),
                          data_collator=OmniCollator(0, {"text": 1.0, "audio": 1.0, "vision": 1.0}))
    trainer.train()
    return model


def test_the_trainer_takes_checkpointing_off_the_last_layers_after_switching_it_on(tmp_path):
    model = _train_one_checkpointed_step(tmp_path, 2)
    flags = [layer.gradient_checkpointing for layer in decoder_layers(model)]
    assert flags == [True] * (len(flags) - 2) + [False, False]


def _saved_bytes_of_a_forward(model, ids):
    """Storages autograd keeps over one whole forward (parameters, the last layer's input and the rotary tables
    left out, as layer_activation_bytes does), tallied from outside the layers."""
    from omnitune.train.checkpointing import saved_tensor_bytes

    held = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def note_inputs(module, args, kwargs):
        held.update(t.untyped_storage().data_ptr() for t in (args[0], *kwargs["position_embeddings"]))

    hook = decoder_layers(model)[-1].register_forward_pre_hook(note_inputs, with_kwargs=True)
    try:
        return saved_tensor_bytes(lambda: model(input_ids=ids), held)
    finally:
        hook.remove()


def test_measuring_saved_tensors_leaves_nothing_alive():
    """A saved output handed back to autograd by the hook would hold its own grad_fn: that cycle kept the
    measured layer's graph (and the adapters' AccumulateGrad nodes) alive and broke the next CUDA-graph capture."""
    import weakref

    from omnitune.train.checkpointing import saved_tensor_bytes

    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    out = []

    def forward():
        y = x.sigmoid()  # sigmoid saves its own output
        out.append(weakref.ref(y))

    assert saved_tensor_bytes(forward) == 8000
    assert out[0]() is None


@pytest.mark.parametrize("qlora", [False, True])
def test_layer_activation_bytes_is_what_an_unchecked_last_layer_adds_to_a_checkpointed_forward(qlora):
    """Measured from outside: the forward with the last layer kept minus the fully checkpointed one. With NF4
    experts too: the dequantized stack, which only checkpointing's hooks make the experts save, is not counted."""
    from omnitune.train.checkpointing import layer_activation_bytes
    from omnitune.model.qlora import quantize_experts

    model = get_peft_model(tiny_thinker("omnitune"), lora_config())
    enable_fast_lora(model)
    bf16_experts = layer_activation_bytes(model, 24)
    if qlora:
        quantize_experts(model)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(10, 240, (1, 24))
    all_checkpointed = _saved_bytes_of_a_forward(model, ids)
    keep_activations(model, 1)
    last_kept = _saved_bytes_of_a_forward(model, ids)
    measured = layer_activation_bytes(model, 24)
    assert measured > 0 and measured == last_kept - all_checkpointed
    assert measured == bf16_experts  # NF4 experts keep the same activations: their weights are rebuilt, not kept
    assert decoder_layers(model)[-1].gradient_checkpointing is False  # the measurement restored the flag
    assert 1.8 < layer_activation_bytes(model, 48) / measured < 2.2  # ~linear in tokens (SDPA attention)


def test_auto_keeps_as_many_layers_as_the_headroom_holds():
    from omnitune.train.checkpointing import auto_uncheckpointed_layers

    model = get_peft_model(tiny_thinker("omnitune"), lora_config())
    enable_fast_lora(model)
    per_layer = auto_uncheckpointed_layers(model, 16, headroom_bytes=0).per_layer_bytes
    layers = len(decoder_layers(model))
    assert [auto_uncheckpointed_layers(model, 16, headroom_bytes=h).layers
            for h in (-5, per_layer - 1, per_layer, 2 * per_layer - 1, 100 * per_layer)] == [0, 0, 1, 1, layers]
    plan = auto_uncheckpointed_layers(model, 16, headroom_bytes=per_layer)
    assert (plan.per_layer_bytes, plan.headroom_bytes) == (per_layer, per_layer)


def test_auto_keeps_every_layer_checkpointed_on_cpu(tmp_path):
    model = _train_one_checkpointed_step(tmp_path, "auto")
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))
