"""GPU check: the CUDA-graph micro-step (train/graphed_step.py) trains like the eager one.

Tiny Qwen3-Omni Thinker (real classes) in bf16 on the GPU, LoRA r8 on attention + experts, the omnitune fast
paths, checkpointing. (1) For padded and packed batches (and padded ones with NF4 experts + the last layer not
checkpointed), several batches of one bucket shape: loss and LoRA gradients of the graph replay vs
OmniTrainer.compute_loss + backward. (2) Media batches (audio, images, video from the demo data): the graph replay
on the encoder cache's stored tower outputs with the collator's host layout, against the eager step running the
towers. (3) OmniTrainer.train for 6 optimizer steps (batch 4, accumulation 2) with graphs on and off: the logged
loss curves. Exits non-zero on a mismatch.
Usage (GPU machine): PYTHONPATH=/tmp/pp:src python bench/check_graphed_training.py [--quick]
"""
from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import replace

import torch
from torch.nn.attention import sdpa_kernel
from transformers import TrainingArguments

import omnitune.kernels as K
from omnitune.data.collate import OmniCollator, to_device
from omnitune.train.checkpointing import keep_activations
from omnitune.model.adapters import apply_adapters
from omnitune.model.qlora import quantize_experts
from omnitune.model.tiny import build_tiny_model
from omnitune.recipe import AdapterConfig, load_recipe
from omnitune.train.graphed_step import MASKED_SDPA_BACKENDS, GraphedTrainStep
from omnitune.train.objectives import PACKED_KEYS, ThinkerLM, packed_position_ids
from omnitune.train.plan import make_plan
from omnitune.train.trainer import OmniTrainer

WEIGHTS = {"text": 1.0, "audio": 0.8, "vision": 0.9}
GPU = torch.cuda.is_available()  # on CPU: a dry run of the code (no graphs, the step runs eagerly)
DEV = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32


def make_model(qlora: bool = False):
    """The tiny Thinker as training runs it; `qlora`: NF4 experts and the last layer not checkpointed (the
    checkpointed layers' recompute then also serves the backward's dequantized experts)."""
    torch.manual_seed(0)
    thinker = build_tiny_model(seed=0).thinker.to(DEV, torch.bfloat16 if GPU else torch.float32)
    K.register_experts_implementation("omnitune")
    thinker.set_experts_implementation("omnitune")
    model = apply_adapters(thinker, AdapterConfig(rank=8, alpha=16, targets=["attention", "experts"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    K.enable_fast_lora(model)
    K.enable_fused_norms(model)
    K.enable_fused_rope()
    model.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False})
    if qlora:
        quantize_experts(model)
        keep_activations(model, 1)
    model.train()
    return model


def samples(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(20, 120, (1,), generator=g))
        ids = torch.randint(10, 5000, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 2] = -100
        out.append(dict(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids), modalities=["text"]))
    return out


def on_gpu(batch: dict) -> dict:
    return {k: v.to(DEV) if torch.is_tensor(v) else v for k, v in batch.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def check_step(model, packing: bool, batch_size: int) -> float:
    thinker = model.get_base_model()
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    objective = ThinkerLM()
    step = GraphedTrainStep(thinker, list(params), bucket=512)
    collate = OmniCollator(0, WEIGHTS, packing=packing)
    worst = 0.0
    for trial in range(4):
        batch = on_gpu(collate(samples(batch_size, seed=trial)))
        assert step.eager_reason(batch) is None or not GPU
        model.zero_grad(set_to_none=True)
        b = dict(batch)
        pos = packed_position_ids(step.backbone, b, *[b.pop(k) for k in PACKED_KEYS]) if packing else None
        loss_g = step(b, pos, None).clone()
        g_g = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        with sdpa_kernel(step.sdpa_backends):  # the attention kernels the graph was captured with: like for like
            loss_e = objective.loss(model, dict(batch), None)
            loss_e.backward()
        g_e = [p.grad.clone() for p in params]
        errs = [rel(a, b) for a, b in zip(g_g, g_e)]
        worst_i = max(range(len(errs)), key=errs.__getitem__)
        worst = max(worst, rel(loss_g, loss_e), errs[worst_i])
        print(f"packing={packing} B={batch_size} batch {trial}: loss eager {loss_e.item():.5f} graph {loss_g.item():.5f}, "
              f"worst grad rel err {errs[worst_i]:.2e} ({names[worst_i]}, |grad| {g_e[worst_i].norm():.2e}), "
              f"attention {'without' if step.sdpa_backends == MASKED_SDPA_BACKENDS else 'with'} cuDNN", flush=True)
    print(f"packing={packing}: graphs {len(step.graphs.graphs)}, eager fallbacks {step.graphs.eager_calls}")
    assert not GPU or (len(step.graphs.graphs) == 1 and step.graphs.eager_calls == 0)
    return worst


def check_media(model) -> float:
    """Graph replays of media batches (stored tower outputs, host layout) against the eager step with the towers."""
    from omnitune.data.cache import prepare_split
    from omnitune.data.encoder_cache import with_encoder_outputs
    from omnitune.data.synthetic import make_demo_dataset
    from omnitune.model.load import load_processor
    from omnitune.train.host_layout import HostLayout

    folder = tempfile.mkdtemp()
    train_file, _ = make_demo_dataset(folder, n_train=16, n_eval=1, seed=11)
    recipe = load_recipe("demo", [f"data.train={train_file}", f"output_dir={folder}/run", "data.workers=1"])
    raw = prepare_split(recipe, load_processor(recipe.model), train_file)
    (cached,) = with_encoder_outputs([raw], model, DEV)
    thinker = model.get_base_model()
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    step = GraphedTrainStep(thinker, list(params), bucket=512)
    plain, layout = OmniCollator(0, WEIGHTS), OmniCollator(0, WEIGHTS, layout=HostLayout(step.backbone))
    worst = 0.0
    for trial in range(4):
        rows = list(range(4 * trial, 4 * trial + 4))
        batch = to_device(layout([cached[i] for i in rows]), torch.device(DEV), DTYPE)
        assert step.eager_reason(batch) is None or not GPU
        model.zero_grad(set_to_none=True)
        b = dict(batch)
        loss_g = step(b, b.pop("position_ids", None), None).clone()
        g_g = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        with sdpa_kernel(step.sdpa_backends):
            loss_e = ThinkerLM().loss(model, to_device(plain([raw[i] for i in rows]), torch.device(DEV), DTYPE), None)
            loss_e.backward()
        g_e = [p.grad.clone() for p in params]
        errs = [rel(a, b) for a, b in zip(g_g, g_e)]
        worst_i = max(range(len(errs)), key=errs.__getitem__)
        worst = max(worst, rel(loss_g, loss_e), errs[worst_i])
        mods = sorted({m for i in rows for m in raw[i]["modalities"]})
        print(f"media batch {trial} ({', '.join(mods)}): loss eager {loss_e.item():.5f} graph {loss_g.item():.5f}, "
              f"worst grad rel err {errs[worst_i]:.2e} ({names[worst_i]})", flush=True)
    print(f"media: graphs {len(step.graphs.graphs)}, eager fallbacks {step.graphs.eager_calls}")
    assert not GPU or step.graphs.eager_calls == 0
    return worst


def train_curve(graphs: bool) -> tuple[list[float], int]:
    model = make_model()
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=6, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1, bf16=GPU,
                             use_cpu=not GPU,
                             report_to=[], save_strategy="no", remove_unused_columns=False, seed=0,
                             disable_tqdm=True)
    plan = replace(make_plan(load_recipe("demo")), cuda_graphs=graphs, graph_bucket=128)
    trainer = OmniTrainer(model=model, args=args, train_dataset=samples(48, seed=7), objective=ThinkerLM(),
                          plan=plan, data_collator=OmniCollator(0, WEIGHTS))
    trainer.train()
    if graphs:
        print(trainer.graph_summary())
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return losses, 0 if trainer.graphed is None else len(trainer.graphed.graphs.graphs)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    model = make_model()
    worst, failed = 0.0, 0
    quick = "--quick" in sys.argv  # two step configurations, no trainer run
    configs = ((False, 1, False), (True, 4, False), (False, 4, False), (False, 4, True))  # packing, batch, qlora
    for packing, batch_size, qlora in configs[:2] if quick else configs:
        print(f"== packing={packing} B={batch_size} qlora={qlora}", flush=True)
        try:
            worst = max(worst, check_step(make_model(qlora=True) if qlora else model, packing, batch_size))
        except Exception:  # report every configuration, not only the first failure
            import traceback

            failed += 1
            print(f"FAILED packing={packing} B={batch_size} qlora={qlora}:\n{traceback.format_exc()[-6000:]}",
                  flush=True)
    print("== media batches", flush=True)
    try:
        worst = max(worst, check_media(make_model()))
    except Exception:
        import traceback

        failed += 1
        print(f"FAILED media batches:\n{traceback.format_exc()[-6000:]}", flush=True)
    if quick:
        print(f"worst step rel err {worst:.2e}: {'OK' if not failed and worst < 3e-2 else 'MISMATCH'}")
        return int(bool(failed) or worst >= 3e-2)
    eager, _ = train_curve(False)
    graphed, n_graphs = train_curve(True)
    curve_err = max(abs(a - b) / abs(b) for a, b in zip(graphed, eager))
    print("trainer eager  ", [round(x, 4) for x in eager])
    print("trainer graphed", [round(x, 4) for x in graphed], f"({n_graphs} graphs)")
    ok = not failed and worst < 3e-2 and len(graphed) == len(eager) == 6 and curve_err < 3e-2 and (n_graphs > 0 or not GPU)
    print(f"worst step rel err {worst:.2e}, worst curve rel err {curve_err:.2e}: {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
