"""QLoRA: NF4 block quantization, experts that run on NF4 weights through the omnitune path, and `omnitune train`
with adapter.method=qlora end to end on the tiny model."""
import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from model_helpers import batch, lora_config, quantized_experts, tiny_thinker
from test_train import demo_data, small_recipe  # noqa: F401  (fixture)

from omnitune.kernels import enable_fast_lora
from omnitune.kernels.nf4 import BLOCK, NF4_CODES, dequantize_nf4, quantize_nf4
from omnitune.model.qlora import attention_linears, quantize_attention, quantize_experts
from omnitune.recipe import RecipeError, load_recipe


def test_nf4_round_trips_grid_values_exactly_and_gaussians_to_nf4_precision():
    torch.manual_seed(0)
    scales = (torch.rand(6, 1) * 3 + 0.1).half().float()  # scales the format stores exactly (fp16)
    on_grid = (torch.tensor(NF4_CODES)[torch.randint(0, 16, (6, BLOCK))] * scales)
    on_grid[:, 0] = scales[:, 0]  # every block holds its absmax
    assert torch.equal(dequantize_nf4(quantize_nf4(on_grid)), on_grid)
    w = torch.randn(4, 96, 128, dtype=torch.bfloat16)
    q = quantize_nf4(w)
    back = dequantize_nf4(q)
    assert back.shape == w.shape and back.dtype == torch.bfloat16
    assert float((back.float() - w.float()).norm() / w.float().norm()) < 0.12
    assert q.absmax.dtype == torch.float16
    assert q.nbytes() - q.codes.numel() * 4 == w.numel() * (0.5 + 2 / BLOCK)  # 0.53125 of 2 bytes per weight
    # the fp16 scales cost nothing measurable: the error is NF4's own, as with exact fp32 scales
    blocks = w.float().reshape(-1, BLOCK)
    exact = blocks.abs().amax(dim=1, keepdim=True)
    grid = torch.tensor(NF4_CODES)
    nearest = grid[(blocks / exact)[..., None].sub(grid).abs().argmin(-1)] * exact
    fp16_err = (dequantize_nf4(quantize_nf4(w.float())).reshape(-1, BLOCK) - blocks).norm()
    assert float(fp16_err) < 1.001 * float((nearest - blocks).norm())
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize_nf4(torch.randn(3, 7))


def test_nf4_keeps_blocks_of_tiny_weights_and_refuses_weights_fp16_scales_cannot_hold():
    """fp16 scales: a block of weights ~1e-6 keeps NF4's relative precision (its scale subnormal, not raised to
    fp16's smallest normal 6.1e-5, which rounded the block to zeros); a non-finite or >65504 weight is a clear
    error naming the tensor (the CLI prints it as one line), not a silently clamped scale."""
    from omnitune.errors import OmnituneError

    torch.manual_seed(0)
    tiny = torch.randn(4, BLOCK) * 1e-6
    back = dequantize_nf4(quantize_nf4(tiny))
    assert float((back - tiny).norm() / tiny.norm()) < 0.15  # NF4's own error on Gaussians is ~0.1
    zero = torch.zeros(2, BLOCK)
    assert torch.equal(dequantize_nf4(quantize_nf4(zero)), zero)
    for bad in (float("inf"), float("nan"), 1e5):
        w = torch.randn(2, BLOCK)
        w[1, 3] = bad
        with pytest.raises(OmnituneError, match="layers.0.q_proj"):
            quantize_nf4(w, "layers.0.q_proj")


def _lora_model():
    torch.manual_seed(0)
    model = get_peft_model(tiny_thinker("omnitune"), lora_config())
    enable_fast_lora(model)
    return model


def test_nf4_experts_compute_exactly_what_the_dequantized_bf16_experts_would():
    model = _lora_model()
    reference = copy.deepcopy(model)
    before, after = quantize_experts(model)
    assert quantized_experts(model) == 2 and after < 0.3 * before
    swapped = 0
    for (name, p), (_, p_ref) in zip(model.named_parameters(), reference.named_parameters()):
        if ".experts." in name and name.endswith((".gate_up_proj", ".down_proj")):  # under PEFT's base_layer(s)
            assert p.numel() == 0  # the bf16 stack is gone
            swapped += 1
            experts = model.get_submodule(name.rsplit(".", 1)[0])
            with torch.no_grad():  # the reference gets the same rounded weights, as ordinary parameters
                p_ref.copy_(experts.omnitune_weight_provider(experts, name.rsplit(".", 1)[1]))
    assert swapped == 4
    inputs = batch()
    out, out_ref = model(**inputs), reference(**inputs)
    torch.testing.assert_close(out.logits, out_ref.logits)
    out.loss.backward()
    out_ref.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and any("experts" in n and "lora_B" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], msg=n)


def test_under_checkpointing_the_recompute_dequantizes_for_the_backward_too():
    """Per experts projection and step: forward + backward = 2 dequantizations without checkpointing (the stack is
    not kept), and 2, not 3, with it (the recompute's stack serves the backward); the gradients do not change."""
    from omnitune.model.qlora import nf4_expert_weight

    model = _lora_model()
    quantize_experts(model)
    calls = []

    def counting_provider(experts, name):
        calls.append(name)
        return nf4_expert_weight(experts, name)

    for m in model.modules():
        if getattr(m, "omnitune_weight_provider", None) is nf4_expert_weight:
            m.omnitune_weight_provider = counting_provider
    model.train()
    inputs = batch()
    grads = {}
    for ckpt in (False, True):
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad(set_to_none=True)
        calls.clear()
        model(**inputs).loss.backward()
        assert len(calls) == 2 * 2 * 2, (ckpt, calls)  # 2 layers x 2 projections x 2 dequantizations
        grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any("experts" in n for n in grads[True])
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], msg=n)


def test_nf4_attention_computes_what_the_rounded_bf16_attention_would_and_dequantizes_in_the_backward(monkeypatch):
    """QLoRA's q/k/v/o weights in NF4 (LoRA on q and v through the shared q/k/v function, k and o plain): logits and
    every gradient equal a model whose attention holds the same rounded weights as parameters; each projection
    dequantizes once in the forward and once in the backward that reaches it (no bf16 copy kept between them)."""
    from omnitune.kernels import nf4

    model = _lora_model()
    reference = copy.deepcopy(model)
    before, after = quantize_attention(model)
    linears = attention_linears(model)
    assert len(linears) == 2 * 4 and after < 0.3 * before
    with torch.no_grad():
        for (_, linear), (_, ref) in zip(linears, attention_linears(reference)):
            assert linear.weight.numel() == 0
            ref.weight.copy_(nf4.frozen_weight(linear))
    calls = []
    dequantize = nf4.dequantize_nf4
    monkeypatch.setattr(nf4, "dequantize_nf4", lambda q: calls.append(q.shape) or dequantize(q))
    inputs = batch()
    out, out_ref = model(**inputs), reference(**inputs)
    assert len(calls) == 8
    torch.testing.assert_close(out.logits, out_ref.logits)
    out.loss.backward()
    out_ref.loss.backward()
    assert len(calls) == 8 + 7  # the backward: all but layer 0's k_proj, whose input (the embeddings) needs no grad
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and any("q_proj.lora_A" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], msg=n)


def test_a_trained_attention_weight_is_not_quantized():
    model = tiny_thinker("omnitune").requires_grad_(False)
    model.model.language_model.layers[0].self_attn.o_proj.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="QLoRA keeps the base frozen"):
        quantize_attention(model)


def test_a_trained_expert_weight_is_not_quantized():
    model = tiny_thinker("omnitune").requires_grad_(False)
    model.model.language_model.layers[0].mlp.experts.gate_up_proj.requires_grad_(True)
    with pytest.raises(ValueError, match="QLoRA keeps the experts frozen"):
        quantize_experts(model)


def test_qlora_needs_the_omnitune_experts_path():
    with pytest.raises(RecipeError, match="model.experts=omnitune"):
        load_recipe("demo", ["adapter.method=qlora", "model.experts=grouped_mm"])
    assert load_recipe("demo", ["adapter.method=qlora"]).adapter.method == "qlora"


@pytest.fixture(scope="module")
def qlora_run(demo_data, tmp_path_factory):  # noqa: F811
    from omnitune.train.run import train

    out = tmp_path_factory.mktemp("qlora") / "run"
    result = train(small_recipe(demo_data, out, "adapter.method=qlora", "train.max_steps=2"))
    assert result.global_step == 2 and result.train_loss == result.train_loss  # finite, not NaN
    return out


def test_train_with_qlora_writes_an_adapter_that_loads_on_the_bf16_base(qlora_run):
    from omnitune.model.source import resolve_source
    from omnitune.model.load import load_thinker

    adapter = qlora_run / "adapter"
    assert (adapter / "adapter_model.safetensors").exists()
    tuned = PeftModel.from_pretrained(load_thinker(resolve_source(qlora_run).model), str(adapter))
    assert any("experts" in n and "lora_A" in n for n, _ in tuned.named_parameters())
    assert quantized_experts(tuned) == 0  # the bf16 base: the adapter is an ordinary LoRA adapter


def test_text_generation_of_a_qlora_run_uses_its_nf4_thinker_with_the_adapter_unmerged(qlora_run, demo_data):  # noqa: F811
    from omnitune.eval.runner import evaluate
    from omnitune.model.source import load_model, resolve_source
    from omnitune.model.load import load_thinker

    src = resolve_source(qlora_run)
    assert src.nf4_experts
    model = load_model(src, speech=False)
    assert isinstance(model, PeftModel) and quantized_experts(model) == 2
    assert all(hasattr(linear, "omnitune_nf4_meta") for _, linear in attention_linears(model))
    # the reference: the bf16 base with its experts and attention rounded the same way, the adapter unmerged on top
    reference = PeftModel.from_pretrained(load_thinker(src.model), str(qlora_run / "adapter")).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if ".experts." in name and name.endswith((".gate_up_proj", ".down_proj")):
                p.copy_(dequantize_nf4(quantize_nf4(p)))
        for _, linear in attention_linears(reference):
            linear.weight.copy_(dequantize_nf4(quantize_nf4(linear.weight)))
    ids = torch.randint(10, 5000, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    report = evaluate(qlora_run, demo_data[1], "qa", compare_base=True, write=False, max_new_tokens=3, limit=2)
    assert list(report.results) == ["base", "tuned"]
