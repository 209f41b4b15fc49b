"""On a tiny real Qwen3-Omni Thinker, the omnitune experts path equals transformers' and PEFT's paths."""
import copy
import statistics

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from omnitune.kernels import disable_fast_expert_lora, enable_fast_expert_lora
from model_helpers import (LAYERS, assert_same, batch, fast_expert_lora_enabled, lora_config, loss_logits_grads,
                           tiny_thinker)


def test_experts_implementation_omnitune_is_selectable_and_full_finetune_matches_eager():
    inputs = batch()
    model = tiny_thinker("eager")
    ref = loss_logits_grads(model, inputs)
    model.set_experts_implementation("omnitune")
    assert model.model.language_model.config._experts_implementation == "omnitune"
    ours = loss_logits_grads(model, inputs)
    assert_same(ours, ref)
    assert any("experts.gate_up_proj" in n for n in ours[1])


@pytest.mark.parametrize("router", [False, True])
def test_fast_expert_lora_equals_peft_logits_and_grads(router):
    inputs = batch()
    peft_model = get_peft_model(tiny_thinker("omnitune"), lora_config(router=router))
    ref = loss_logits_grads(peft_model, inputs)
    assert enable_fast_expert_lora(peft_model) == LAYERS
    assert fast_expert_lora_enabled(peft_model)
    ours = loss_logits_grads(peft_model, inputs)
    assert_same(ours, ref)
    expert_lora = [n for n in ours[1] if "experts" in n and "lora_" in n]
    assert len(expert_lora) == 2 * 2 * LAYERS
    if router:
        assert any("mlp.gate.lora_A" in n for n in ours[1])
    # the switch is reversible and PEFT's own forward comes back
    assert disable_fast_expert_lora(peft_model) == LAYERS
    assert not fast_expert_lora_enabled(peft_model)
    assert_same(loss_logits_grads(peft_model, inputs), ref)


def test_router_trainable_with_frozen_experts_and_expert_lora():
    inputs = batch()
    peft_model = get_peft_model(tiny_thinker("omnitune"), lora_config())
    for name, p in peft_model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            p.requires_grad_(True)
    ref = loss_logits_grads(peft_model, inputs)
    enable_fast_expert_lora(peft_model)
    ours = loss_logits_grads(peft_model, inputs)
    assert_same(ours, ref)
    assert sum(n.endswith("mlp.gate.weight") for n in ours[1]) == LAYERS


def test_disabled_adapters_and_merge_unload_agree_with_fast_path(tmp_path):
    inputs = batch()
    base = tiny_thinker("omnitune")
    base_state = copy.deepcopy(base.state_dict())
    peft_model = get_peft_model(base, lora_config())
    enable_fast_expert_lora(peft_model)
    peft_model.eval()
    with torch.no_grad():
        fast_logits = peft_model(**inputs).logits
        with peft_model.disable_adapter():
            no_lora = peft_model(**inputs).logits
    peft_model.save_pretrained(tmp_path)

    fresh = tiny_thinker("omnitune")
    fresh.load_state_dict(base_state)
    with torch.no_grad():
        assert torch.allclose(fresh(**inputs).logits, no_lora, atol=1e-9)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    enable_fast_expert_lora(loaded)
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, fast_logits, atol=1e-9)
        merged = loaded.merge_and_unload()
        assert torch.allclose(merged(**inputs).logits, fast_logits, atol=1e-9)


def test_enable_fast_lora_covers_attention_and_experts_and_matches_peft():
    from omnitune.kernels import disable_fast_lora, enable_fast_lora

    inputs = batch()
    peft_model = get_peft_model(tiny_thinker("omnitune"), lora_config())
    ref = loss_logits_grads(peft_model, inputs)
    assert enable_fast_lora(peft_model) == {"experts": LAYERS, "linear": 2 * LAYERS}
    assert_same(loss_logits_grads(peft_model, inputs), ref)
    assert disable_fast_lora(peft_model) == {"experts": LAYERS, "linear": 2 * LAYERS}
    assert_same(loss_logits_grads(peft_model, inputs), ref)


def test_fast_lora_in_bf16_is_as_close_to_fp64_as_peft_in_bf16():
    """Seeded: bf16 flips near-tied top-k choices, each path its own, and a flip moves a token's logits and its
    experts' gradients by tens of %. Over 25 random draws the gradient check failed 2 times, with the same seeds and
    the same medians before and after the q/k/v and expert-LoRA kernel changes: a property of the draw."""
    from omnitune.kernels import enable_fast_lora

    torch.manual_seed(0)
    inputs = batch()
    base64 = tiny_thinker("omnitune")
    base_state = copy.deepcopy(base64.state_dict())
    peft64 = get_peft_model(base64, lora_config())
    lora_state = {k: v.detach().clone() for k, v in peft64.state_dict().items() if "lora_" in k}
    ref_logits, ref_grads = loss_logits_grads(peft64, inputs)

    def bf16_run(fast):
        base = tiny_thinker("omnitune")
        base.load_state_dict(base_state)
        model = get_peft_model(base.bfloat16(), lora_config())  # PEFT upcasts the adapters to fp32
        model.load_state_dict({k: v.float() for k, v in lora_state.items()}, strict=False)
        if fast:
            enable_fast_lora(model)
        return loss_logits_grads(model, inputs)

    rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
    (peft_logits, peft_grads), (fast_logits, fast_grads) = bf16_run(False), bf16_run(True)
    # the median token's error is the precision; the norm over all tokens mostly counts flips. Ours must not be
    # worse than PEFT's (exact equality is checked in fp64, above)
    token_rel = lambda a, b: float(((a.double() - b).norm(dim=-1) / b.norm(dim=-1)).median())  # noqa: E731
    assert token_rel(fast_logits, ref_logits) < 2 * token_rel(peft_logits, ref_logits) + 2e-2
    grad_err = lambda grads: statistics.median(rel(grads[n], ref_grads[n]) for n in ref_grads)  # noqa: E731
    assert grad_err(fast_grads) < 2 * grad_err(peft_grads) + 2e-2


@pytest.mark.parametrize("checkpointing", [False, True])
def test_q_k_v_lora_share_one_computation_and_match_peft(checkpointing, monkeypatch):
    """q/k/v read the same normed input: one shared LoRA computation per attention call (the checkpoint recompute
    makes a second), logits and every gradient as PEFT computes them."""
    from omnitune.kernels import enable_fast_lora
    from omnitune.kernels import peft_lora

    attn = [f"model.language_model.layers.{i}.self_attn.{p}" for i in range(LAYERS)
            for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=attn, init_lora_weights=False)
    inputs = batch()
    model = get_peft_model(tiny_thinker("omnitune"), config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ref = loss_logits_grads(model, inputs)
    enable_fast_lora(model)
    calls = []
    apply = peft_lora._SharedInputLoRAFunction.apply
    monkeypatch.setattr(peft_lora._SharedInputLoRAFunction, "apply",
                        lambda x, scalings, *a: calls.append(len(scalings)) or apply(x, scalings, *a))
    fast = loss_logits_grads(model, inputs)
    assert calls.count(1) == calls.count(3) and len(calls) == 2 * calls.count(3)  # o_proj alone, q/k/v together
    assert calls.count(3) == LAYERS * (2 if checkpointing else 1)
    assert_same(fast, ref)
    assert sum("k_proj.lora_A" in n for n in fast[1]) == LAYERS
