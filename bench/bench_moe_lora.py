"""Kernel-level benchmarks of the Thinker's LoRA step: omnitune's fast paths vs plain transformers grouped_mm + PEFT.

What `omnitune train` delivers is measured by bench/bench_train.py (the real trainer); this script times the
pieces on their own: one MoE layer, and a hand-built 48-layer step whose ablations (`ours~norms`, `+keep8`, ...)
attribute the gain to each kernel. Real widths, random bf16 weights on the GPU (hidden 2048, 48 layers, 32/4 heads, head_dim 128, 128 experts
top-8, moe_intermediate 768, vocab 152064). Each measurement runs in its own subprocess so the two paths never
share memory. Parts:
  layer  one MoE block (router + experts) fwd+bwd at 4096 tokens, expert LoRA r16 (base frozen)
  model  the 48-layer Thinker text step: LoRA r16 on q/k/v/o + fused experts, gradient checkpointing, batch 1,
         forward + backward + AdamW step on the LoRA parameters
  smoke  small sizes on the GPU: grouped_mm availability, fast path vs fp64 reference, zero-token experts
Usage (GPU machine): PYTHONPATH=/tmp/pp:src:bench python bench/bench_moe_lora.py [--parts smoke,layer,model]
MFU = tok/s * 4 * active params of the depth measured / 770e12 (bench/common.py; 3.042e9 at 48 layers).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from common import PEAK_FLOPS, REAL, active_params, build_on_device, mfu, thinker_config

DEVICE = os.environ.get("BENCH_DEVICE", "cuda")  # "cpu" + BENCH_TINY=1: a dry run of the code paths


def cuda_time_ms(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def count_host_syncs(fn) -> int:
    """How many times one call of `fn` makes the CPU wait for the GPU (torch's sync debug mode, as warnings)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


def first_host_sync(fn) -> str:
    """Run `fn` with host syncs turned into errors: where the first one happens (what breaks graph capture)."""
    import traceback

    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except RuntimeError:
        return traceback.format_exc()[-2500:]
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def want_profile(label: str) -> bool:
    """BENCH_PROFILE=1 profiles every run; BENCH_PROFILE=a,b only labels starting with a or b."""
    spec = os.environ.get("BENCH_PROFILE", "")
    return DEVICE == "cuda" and bool(spec) and (spec == "1" or any(label.startswith(p) for p in spec.split(",")))


def profile_print(step, label: str, steps: int) -> None:
    """Per-op GPU time (self), summed over `steps` steps, to stderr: where the time goes, by aten op."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=28, max_name_column_width=60)
    print(f"== profile {label} ({steps} steps)\n{table}", file=sys.stderr, flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir:
        by_shape = prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cuda_time_total", row_limit=120, max_name_column_width=50, max_shapes_column_width=90)
        with open(os.path.join(out_dir, f"prof_{label.replace('+', '_')}.txt"), "w") as f:
            f.write(f"{table}\n\n{by_shape}\n")
        if os.environ.get("BENCH_TRACE"):  # every kernel in launch order, for reading one layer's sequence
            trace = os.path.join(out_dir, f"trace_{label.replace('+', '_')}.json")
            prof.export_chrome_trace(trace)
            subprocess.run(["gzip", "-f", trace], check=True)


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0


# ----------------------------------------------------------------------------------------------- one MoE layer
def run_layer(impl: str, tokens: int = 4096, rank: int = 16) -> dict:
    from peft import LoraConfig, inject_adapter_in_model
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextSparseMoeBlock

    import omnitune.kernels as K

    K.register_experts_implementation("omnitune")
    name = impl
    impl, *extra = impl.split("+")  # "ours+graph": fwd + bwd replayed as one CUDA graph, as the trainer runs it
    cfg = thinker_config(1).text_config
    cfg._experts_implementation = "omnitune" if impl == "ours" else "grouped_mm"
    block = build_on_device(Qwen3OmniMoeThinkerTextSparseMoeBlock, cfg, DEVICE)
    block.requires_grad_(False)
    lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[], init_lora_weights=False,
                      target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    block = inject_adapter_in_model(lcfg, block)
    for n, p in block.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()  # PEFT keeps adapters in fp32 next to a bf16 base (autocast_adapter_dtype)
            p.requires_grad_(True)
    if impl == "ours":
        assert K.enable_fast_expert_lora(block) == 1
        assert K.enable_fused_router(block) == 1
    x = torch.randn(1, tokens, REAL["hidden"], device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)

    def eager_step():
        out = block(x)
        out.backward(g)

    step = eager_step
    if "graph" in extra:  # x is a leaf here, so dX is computed just as out.backward(g) computes it
        from omnitune.train.cuda_graph import GraphedGrads

        params = [x] + [p for p in block.parameters() if p.requires_grad]
        graphed = GraphedGrads(lambda g: (block(x) * g).sum(), params)
        step = functools.partial(graphed, g)

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = cuda_time_ms(step, warmup=3, iters=20)
    ms = statistics.median(times)
    label = f"layer_{name.replace('+', '_')}"
    if want_profile(label):
        profile_print(step, label, steps=3)
    return dict(part="layer", impl=name, tokens=tokens, ms=ms, tok_s=tokens / ms * 1e3,
                peak_gib=peak_gib())


# ----------------------------------------------------------------------------------------------- whole Thinker
def run_model(impl: str, seq: int, layers: int = 48, rank: int = 16, steps: int = 6) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    import omnitune.kernels as K

    K.register_experts_implementation("omnitune")
    t0 = time.time()
    cfg = thinker_config(layers)
    model = build_on_device(Qwen3OmniMoeThinkerForConditionalGeneration, cfg, DEVICE)
    model.set_experts_implementation("omnitune" if impl == "ours" else "grouped_mm")
    model.config.use_cache = False
    prefix = "model.language_model.layers"
    attn = [f"{prefix}.{i}.self_attn.{p}" for i in range(layers) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    experts = [f"{prefix}.{i}.mlp.experts.{p}" for i in range(layers) for p in ("gate_up_proj", "down_proj")]
    lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=attn, target_parameters=experts)
    model = get_peft_model(model, lcfg)
    # "ours~norms~linear~loss~qkv~router~select~handoff~adamw" = ours with those features off (to attribute the
    # gain); "ours+graph" = ours with the whole forward + backward replayed as one CUDA graph (kernels.cuda_graph)
    # "+sac" / "+sacmm" = selective checkpointing (train/checkpointing.py: attention outputs / and dense GEMMs kept)
    # "+qlora" = the experts' weights in 4-bit NF4 (model/qlora.py)
    name = impl
    impl, *off = impl.split("~")
    impl, *extra = impl.split("+")
    graphed = "graph" in extra
    # checkpointing must not save/restore the CUDA RNG state inside a graph capture (no dropout here)
    ckpt = {"use_reentrant": False, "preserve_rng_state": not graphed}
    if "sac" in extra or "sacmm" in extra:
        from omnitune.train.checkpointing import selective_checkpoint_context

        ckpt["context_fn"] = selective_checkpoint_context(save_matmuls="sacmm" in extra)
        model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt)
    elif "nockpt" not in extra:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
    # "+keepN": the last N layers without checkpointing (train/checkpointing.keep_activations)
    keep = [int(e[len("keep"):]) for e in extra if e.startswith("keep") and e != "keepauto"]
    if keep:
        from omnitune.train.checkpointing import keep_activations

        keep_activations(model, keep[0])
    model.train()
    if impl == "ours":
        assert K.enable_fast_expert_lora(model) == layers
        if "linear" not in off:
            assert K.enable_fast_lora_linear(model, share_inputs="qkv" not in off) == 4 * layers
        if "norms" not in off:
            K.enable_fused_norms(model)
        if "rope" not in off:
            K.enable_fused_rope()
        if "router" not in off:
            K.enable_fused_router(model)
        if "qlora" in extra:  # the experts' bf16 stacks replaced by NF4 (model/qlora.py), dequantized per GEMM
            from omnitune.model.qlora import quantize_experts

            quantize_experts(model)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    auto = {}
    if "keepauto" in extra:  # as many layers as the GPU holds, decided as `omnitune train` does (the default)
        from omnitune.train.checkpointing import auto_uncheckpointed_layers, keep_activations

        plan = auto_uncheckpointed_layers(model, seq)
        keep_activations(model, plan.layers)
        auto = dict(keep_layers=plan.layers, per_layer_gib=plan.per_layer_bytes / 2**30,
                    headroom_gib=plan.headroom_bytes / 2**30)
    if "select" in off:  # the graphed step's head on every position, not only the trained ones
        import omnitune.train.graphed_step as graphed_step

        graphed_step.GraphedTrainStep.head_rows = lambda self, shape, count: shape[0] * (shape[1] - 1)
    if "handoff" in off:  # every micro-step accumulates into zeroed buffers (no hand-off of the graph's own grads)
        from omnitune.train.cuda_graph import GraphedGrads

        GraphedGrads._window_open = lambda self: True
    if "lorakernels" in off:  # the experts' LoRA products all on torch's grouped GEMM (kernels/expert_lora.py)
        import omnitune.kernels.expert_lora as expert_lora

        expert_lora._triton_applies = lambda *args: False
    chunked_loss = impl == "ours" and "loss" not in off
    build_s = time.time() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    # PEFT: fused AdamW, what HF Trainer uses by default (optim "adamw_torch_fused"); ours: the AdamW that
    # OmniTrainer picks instead (train/optimizer.py: the same update in one Triton launch), `~adamw` torch's fused
    if impl == "ours" and "adamw" not in off:
        from omnitune.train.optimizer import MultiTensorAdamW

        opt = MultiTensorAdamW(params, lr=1e-5)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5, fused=DEVICE == "cuda")
    ids = torch.randint(0, REAL["vocab"], (1, seq), device=DEVICE)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : seq // 8] = -100
    thinker = model.base_model.model

    def chunked_loss_fn(ids, labels, mask=None):
        hidden = thinker.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[0]
        shifted = torch.cat([labels[0, 1:], labels.new_full((1,), -100)])
        per_token = K.chunked_linear_cross_entropy(hidden, thinker.lm_head.weight, shifted)
        return per_token.sum() / (shifted != -100).sum()

    if graphed:  # the trainer's own graphed micro-step (train/graphed_step.py), as `omnitune train` runs it
        from omnitune.train.graphed_step import GraphedTrainStep

        graph_step = GraphedTrainStep(thinker, params, bucket=512)
        batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
        assert DEVICE != "cuda" or graph_step.eager_reason(batch) is None
        graph_args = graph_step.prepare(batch, None, None)  # the eager prefix may sync; the captured part must not
        sync_report = first_host_sync(lambda: torch.autograd.grad(
            graph_step._loss(*graph_args), params, allow_unused=True)) if DEVICE == "cuda" else None

    marks: list[torch.cuda.Event] = []  # per graphed step: start, graph replay start / end, end (GPU clock)

    def mark():
        if graphed and DEVICE == "cuda":
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()

    if graphed and DEVICE == "cuda":
        replay = torch.cuda.CUDAGraph.replay

        def marked_replay(self):
            mark()
            replay(self)
            mark()

        torch.cuda.CUDAGraph.replay = marked_replay

    def step():
        mark()
        if graphed:  # causal attention without a mask tensor: no host-side "is the mask all ones" check
            loss = graph_step(batch, None, None)  # gradients accumulated into p.grad, as loss.backward() does
        else:
            loss = chunked_loss_fn(ids, labels, mask) if chunked_loss else model(
                input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark()
        return loss

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = cuda_time_ms(step, warmup=2, iters=steps)
    phases = {}
    # the timed steps' GPU time before the graph (eager prefix, input copies), in it, and after it (AdamW)
    if marks and len(marks) % 4 == 0:
        torch.cuda.synchronize()
        steps_marks = [marks[i:i + 4] for i in range(0, len(marks), 4)][-steps:]
        for k, name_ in enumerate(("before_graph", "graph", "after_graph")):
            phases[f"{name_}_ms"] = statistics.median(m[k].elapsed_time(m[k + 1]) for m in steps_marks)
    if graphed and DEVICE == "cuda":
        torch.cuda.CUDAGraph.replay = replay
    syncs = count_host_syncs(step) if DEVICE == "cuda" else None
    label = f"model_{name.replace('~', '_')}_{seq}_{layers}"
    if want_profile(label):
        profile_print(step, label, steps=1)
    ms = statistics.median(times)
    return dict(part="model", impl=name, seq=seq, layers=layers, ms=ms, tok_s=seq / ms * 1e3,
                mfu=mfu(seq / ms * 1e3, active_params(cfg.text_config)),
                peak_gib=peak_gib(), build_s=build_s, host_syncs_per_step=syncs,
                alloc_retries=torch.cuda.memory_stats().get("num_alloc_retries") if DEVICE == "cuda" else None,
                alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                trainable_params=sum(p.numel() for p in params), times_ms=times, **auto, **phases,
                **({"first_host_sync": sync_report, "eager_calls": graph_step.graphs.eager_calls,
                    "graphs": len(graph_step.graphs.graphs)} if graphed else {}))


# ----------------------------------------------------------------------------------------------- smoke checks
def run_smoke() -> dict:
    from omnitune.kernels.grouped_gemm import grouped_mm_available
    from omnitune.kernels.loss import chunked_linear_cross_entropy, reference_linear_cross_entropy
    from omnitune.kernels.moe_experts import moe_experts_forward, reference_experts_forward

    torch.manual_seed(int(time.time()))
    dev = "cuda"
    E, H, I, T, K, r, used = 16, 256, 128, 512, 4, 16, 12
    res = {}

    class Experts(torch.nn.Module):
        pass

    ex = Experts()
    ex.num_experts = E
    ex.act_fn = torch.nn.functional.silu
    gu = torch.randn(E, 2 * I, H, device=dev, dtype=torch.float64) / H**0.5
    dn = torch.randn(E, H, I, device=dev, dtype=torch.float64) / I**0.5
    x = torch.randn(T, H, device=dev, dtype=torch.float64)
    idx = torch.stack([torch.randperm(used, device=dev)[:K] for _ in range(T)])  # experts 12..15 get no tokens
    w = torch.softmax(torch.randn(T, K, device=dev, dtype=torch.float64), -1)
    lora = {"gate_up_proj": [(torch.randn(E, r, H, device=dev, dtype=torch.float64) * 0.05,
                              torch.randn(E, 2 * I, r, device=dev, dtype=torch.float64) * 0.05, 2.0)],
            "down_proj": [(torch.randn(E, r, I, device=dev, dtype=torch.float64) * 0.05,
                           torch.randn(E, H, r, device=dev, dtype=torch.float64) * 0.05, 2.0)]}
    leaves64 = [x, w, gu, dn] + [t for v in lora.values() for a, b, _ in v for t in (a, b)]
    for t in leaves64:
        t.requires_grad_(True)
    ref = reference_experts_forward(gu, dn, x, idx, w, lora=lora)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * g).sum(), leaves64)

    leaves16 = [t.detach().bfloat16().requires_grad_(True) for t in leaves64]
    x16, w16, gu16, dn16, a1, b1, a2, b2 = leaves16
    ex.gate_up_proj, ex.down_proj = gu16, dn16
    res["grouped_mm_available"] = grouped_mm_available(x16, gu16.transpose(-2, -1))
    out = moe_experts_forward(ex, x16, idx, w16, lora={"gate_up_proj": [(a1, b1, 2.0)], "down_proj": [(a2, b2, 2.0)]})
    grads = torch.autograd.grad((out.double() * g).sum(), leaves16)
    rel = lambda a, b: float((a.double() - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    res["fwd_rel"] = rel(out, ref)
    names = ["x", "routing_w", "gate_up_W", "down_W", "A_gu", "B_gu", "A_down", "B_down"]
    res["grad_rel"] = {n: rel(a, b) for n, a, b in zip(names, grads, ref_grads)}
    res["moe_host_syncs"] = count_host_syncs(lambda: torch.autograd.grad(
        (moe_experts_forward(ex, x16, idx, w16, lora={"gate_up_proj": [(a1, b1, 2.0)], "down_proj": [(a2, b2, 2.0)]})
         .double() * g).sum(), leaves16))
    res["unused_expert_grads_zero"] = all(bool((gr[used:] == 0).all()) for gr in grads[2:])
    res["all_finite"] = all(bool(torch.isfinite(gr).all()) for gr in grads) and bool(torch.isfinite(out).all())
    # frozen base (the LoRA case): one autograd node for the base product and the LoRA A products
    ex.gate_up_proj, ex.down_proj = gu16.detach(), dn16.detach()
    frozen = [x16, w16, a1, b1, a2, b2]
    out = moe_experts_forward(ex, x16, idx, w16, lora={"gate_up_proj": [(a1, b1, 2.0)], "down_proj": [(a2, b2, 2.0)]})
    grads_f = torch.autograd.grad((out.double() * g).sum(), frozen)
    ref_f = [ref_grads[i] for i in (0, 1, 4, 5, 6, 7)]
    res["frozen_grad_rel"] = {n: rel(a, b) for n, a, b in zip(["x", "routing_w", "A_gu", "B_gu", "A_down", "B_down"],
                                                              grads_f, ref_f)}
    # linear LoRA layers sharing one input (q/k/v), bf16 activations, fp32 adapters, vs fp64
    from omnitune.kernels.peft_lora import _SharedInputLoRAFunction

    outs_dims, rank, din = (512, 64, 64), 16, 256
    xs = torch.randn(300, din, device=dev, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(o, din, device=dev, dtype=torch.float64) / din**0.5 for o in outs_dims]
    la = [(torch.randn(rank, din, device=dev, dtype=torch.float64) * 0.1).requires_grad_(True) for _ in outs_dims]
    lb = [(torch.randn(o, rank, device=dev, dtype=torch.float64) * 0.1).requires_grad_(True) for o in outs_dims]
    gs = [torch.randn(300, o, device=dev, dtype=torch.float64) for o in outs_dims]
    ref = [xs @ w.T + 2.0 * (xs @ a.T) @ b.T for w, a, b in zip(ws, la, lb)]
    ref_g = torch.autograd.grad(sum((o * gg).sum() for o, gg in zip(ref, gs)), [xs, *la, *lb])
    x16s = xs.detach().bfloat16().requires_grad_(True)
    la32 = [a.detach().float().requires_grad_(True) for a in la]
    lb32 = [b.detach().float().requires_grad_(True) for b in lb]
    outs = _SharedInputLoRAFunction.apply(x16s, (2.0,) * 3, (rank,) * 3, *(w.bfloat16() for w in ws), *la32, *lb32)
    got_g = torch.autograd.grad(sum((o.double() * gg).sum() for o, gg in zip(outs, gs)), [x16s, *la32, *lb32])
    res["shared_lora_rel"] = [rel(o, r_) for o, r_ in zip(outs, ref)] + [rel(a, b) for a, b in zip(got_g, ref_g)]
    res["shared_lora_grad_dtypes"] = [str(t.dtype) for t in got_g]
    # the fused router top-k (Triton) against transformers' math on the same bf16 logits
    from omnitune.kernels.router import top_k_softmax, top_k_softmax_reference

    logits = torch.randn(4096, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    scores, chosen = top_k_softmax(logits, 8, True)
    ref_scores, ref_chosen = top_k_softmax_reference(logits, 8, True)
    # bf16 logits tie often: tied experts may come in another slot order, so the upstream gradient is keyed by
    # expert (as the experts path hands it back), not by slot
    g_expert = torch.randn(4096, 128, device=dev, dtype=torch.bfloat16)
    (d_fast,) = torch.autograd.grad((scores * g_expert.gather(1, chosen)).sum(), logits)
    (d_ref,) = torch.autograd.grad((ref_scores * g_expert.gather(1, ref_chosen)).sum(), logits)
    rows_ok = (chosen.sort(-1).values == ref_chosen.sort(-1).values).all(-1)  # a tie at the k-th place may differ
    res["router_rows_same_experts"] = float(rows_ok.float().mean())
    res["router_rel"] = [rel(scores[rows_ok].sort(-1).values, ref_scores[rows_ok].sort(-1).values.double()),
                         rel(d_fast[rows_ok], d_ref[rows_ok].double())]

    h = torch.randn(3000, 512, device=dev, dtype=torch.float64, requires_grad=True)
    W = (torch.randn(20000, 512, device=dev, dtype=torch.float64) / 512**0.5).requires_grad_(True)
    lab = torch.randint(0, 20000, (3000,), device=dev)
    lab[::7] = -100
    lr = reference_linear_cross_entropy(h, W, lab)
    gl = torch.autograd.grad(lr.sum(), (h, W))
    h16, W16 = h.detach().bfloat16().requires_grad_(True), W.detach().bfloat16().requires_grad_(True)
    lf = chunked_linear_cross_entropy(h16, W16, lab, chunk_size=1024)
    gf = torch.autograd.grad(lf.sum(), (h16, W16))
    res["loss_rel"] = rel(lf, lr)
    res["loss_grad_rel"] = [rel(a, b) for a, b in zip(gf, gl)]
    # frozen head (LoRA): the compiled one-pass path that forms the hidden gradient during the forward
    h16f = h.detach().bfloat16().requires_grad_(True)
    lff = chunked_linear_cross_entropy(h16f, W.detach().bfloat16(), lab, chunk_size=1024)
    (gff,) = torch.autograd.grad(lff.sum(), h16f)
    res["loss_frozen_head_rel"] = [rel(lff, lr), rel(gff, gl[0])]
    from omnitune.kernels.fused_ops import rms_norm, rms_norm_reference, weighted_swiglu, weighted_swiglu_reference

    xn = torch.randn(2, 300, 2048, device=dev, dtype=torch.bfloat16, requires_grad=True)
    wn = torch.randn(2048, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gn = torch.randn_like(xn)
    a = rms_norm(xn, wn, 1e-6)
    ga = torch.autograd.grad((a * gn).sum(), (xn, wn))
    b = rms_norm_reference(xn.double(), wn.double(), 1e-6)
    gb = torch.autograd.grad((b * gn.double()).sum(), (xn, wn))
    res["rms_norm_rel"] = [rel(a, b)] + [rel(u, v.double()) for u, v in zip(ga, gb)]
    gu = torch.randn(777, 1536, device=dev, dtype=torch.bfloat16, requires_grad=True)
    rw = torch.rand(777, device=dev, dtype=torch.bfloat16, requires_grad=True)
    a = weighted_swiglu(gu, rw)
    ga = torch.autograd.grad((a * a.detach()).sum(), (gu, rw))
    b = weighted_swiglu_reference(gu.double(), rw.double())
    gb = torch.autograd.grad((b * a.detach().double()).sum(), (gu, rw))
    res["swiglu_rel"] = [rel(a, b)] + [rel(u, v.double()) for u, v in zip(ga, gb)]
    from omnitune.kernels.fused_ops import _rope_reference, apply_rotary_pos_emb

    q = torch.randn(1, 4096, 32, 128, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_(True)
    k = torch.randn(1, 4, 4096, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = torch.randn(2, 1, 4096, 128, device=dev, dtype=torch.bfloat16).unbind(0)
    qa, ka = apply_rotary_pos_emb(q, k, cos, sin)
    ga = torch.autograd.grad((qa * qa.detach()).sum() + (ka * ka.detach()).sum(), (q, k))
    qb, kb = _rope_reference(q.double(), k.double(), cos.double(), sin.double())
    gb = torch.autograd.grad((qb * qa.detach().double()).sum() + (kb * ka.detach().double()).sum(), (q, k))
    res["rope_rel"] = [rel(qa, qb), rel(ka, kb)] + [rel(u, v.double()) for u, v in zip(ga, gb)]
    ok = all(v < 1e-2 for v in res["rms_norm_rel"] + res["swiglu_rel"] + res["rope_rel"])
    ok = ok and res["fwd_rel"] < 2e-2 and all(v < 3e-2 for v in res["grad_rel"].values()) and res["unused_expert_grads_zero"]
    ok = ok and all(v < 3e-2 for v in res["frozen_grad_rel"].values()) and all(v < 2e-2 for v in res["shared_lora_rel"])
    ok = ok and res["shared_lora_grad_dtypes"] == ["torch.bfloat16"] + ["torch.float32"] * 6
    ok = ok and res["router_rows_same_experts"] > 0.99 and all(v < 1e-2 for v in res["router_rel"])
    ok = ok and res["all_finite"] and res["loss_rel"] < 1e-2 and all(v < 2e-2 for v in res["loss_grad_rel"])
    ok = ok and all(v < 2e-2 for v in res["loss_frozen_head_rel"])
    res["ok"] = bool(ok)
    res["part"] = "smoke"
    return res


def run_peak(n: int = 8192) -> dict:
    """The GPU's dense bf16 matmul rate on random data (n^3), the ceiling the MFU constant stands for."""
    a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    ms = statistics.median(cuda_time_ms(lambda: a @ b, warmup=3, iters=10))
    return dict(part="peak", n=n, ms=ms, tflops=2 * n**3 / ms / 1e9, mfu_constant_tflops=PEAK_FLOPS / 1e12)


# ----------------------------------------------------------------------------------------------- driver
def child(spec: str) -> None:
    part, *rest = spec.split(":")
    if part == "smoke":
        result = run_smoke()
    elif part == "peak":
        result = run_peak()
    elif part == "layer":
        result = run_layer(rest[0])
    else:
        result = run_model(rest[0], int(rest[1]), layers=int(rest[2]) if len(rest) > 2 else 48)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(spec: str, timeout: int) -> dict:
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(spec=spec, error=f"timeout after {timeout}s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if os.environ.get("BENCH_PROFILE"):
        print("\n".join(ln for ln in proc.stderr.splitlines() if "%" in ln or "==" in ln or "Name" in ln)[-9000:])
    if proc.returncode != 0 or not lines:
        err = proc.stderr.strip().splitlines()
        oom = any("OutOfMemory" in ln or "out of memory" in ln for ln in err)
        captures = [ln[:400] for ln in err if "capture failed" in ln]  # the first of a retried capture too
        return dict(spec=spec, error="OOM" if oom else "\n".join(captures + err[-15:]), wall_s=time.time() - t0)
    out = json.loads(lines[-1][len("RESULT "):])
    out["wall_s"] = time.time() - t0
    return out


def table(results: list[dict]) -> str:
    rows = ["| part | path | tokens | ms/step | tok/s | MFU | peak GiB | speed-up |", "|---|---|---|---|---|---|---|---|"]
    base = {}  # the transformers + PEFT row of the same part, tokens and layer count

    def key(r):
        return r["part"], r.get("seq", r.get("tokens")), r.get("layers")

    for r in results:
        if r.get("part") in ("layer", "model") and r.get("impl") == "peft":
            base[key(r)] = r["ms"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['spec']} | | | {r['error'][:60]} | | | | |")
            continue
        if r.get("part") not in ("layer", "model"):
            continue
        n = r.get("seq", r.get("tokens"))
        b = base.get(key(r))
        impl, *off = r["impl"].split("~")
        impl, *extra = impl.split("+")
        label = "transformers grouped_mm + PEFT" if impl == "peft" else "omnitune" + "".join(
            {"graph": " + CUDA graph", "sac": " + selective ckpt", "sacmm": " + selective ckpt (GEMMs kept)",
             "qlora": " + NF4 experts (QLoRA)", "nockpt": " + no checkpointing",
             "keepauto": f" + last {r.get('keep_layers')} layers not checkpointed (auto)"}.get(e)
            or f" + last {e[len('keep'):]} layers not checkpointed" for e in extra) + (
            f" (no {'/'.join(off)})" if off else "")
        if r.get("layers", 48) != 48:
            label += f" ({r['layers']} layers)"
        mfu_s = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        rows.append(f"| {r['part']} | {label} | {n} | {r['ms']:.2f} | {r['tok_s']:.0f} | {mfu_s} | "
                    f"{r['peak_gib']:.1f} | {b / r['ms']:.2f}x |" if b else
                    f"| {r['part']} | {label} | {n} | {r['ms']:.2f} | {r['tok_s']:.0f} | {mfu_s} | {r['peak_gib']:.1f} | - |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child")
    ap.add_argument("--parts", default="smoke,layer,model")
    ap.add_argument("--seqs", default="4096,8192")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--ablate", default="", help="extra model variants, e.g. ours~norms,ours~linear,ours~loss")
    ap.add_argument("--specs", default="", help="explicit child specs instead of --parts, e.g. model:ours+graph:4096:48")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per subprocess")
    args = ap.parse_args()
    if args.child:
        return child(args.child)

    import peft
    import transformers

    info = dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    print(json.dumps(info), flush=True)
    parts = args.parts.split(",")
    specs = []
    if "smoke" in parts:
        specs.append("smoke")
    if "layer" in parts:
        specs += ["layer:peft", "layer:ours"]
    if "model" in parts:
        for seq in args.seqs.split(","):
            specs += [f"model:peft:{seq}:{args.layers}", f"model:ours:{seq}:{args.layers}"]
            specs += [f"model:{v}:{seq}:{args.layers}" for v in args.ablate.split(",") if v]
    if args.specs:
        specs = args.specs.split(",")
    results = []
    out_dir = os.environ.get("OUT", ".")
    os.makedirs(out_dir, exist_ok=True)
    for spec in specs:
        r = spawn(spec, args.timeout)
        results.append(r)
        print(json.dumps(r), flush=True)
        with open(os.path.join(out_dir, "bench_moe_lora.json"), "w") as f:
            json.dump(dict(info=info, results=results), f, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
