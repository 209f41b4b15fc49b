"""`omnitune train`: recipe -> data -> model -> trainer -> run directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from rich.console import Console
from rich.table import Table
from transformers import TrainingArguments, set_seed
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import get_last_checkpoint

from omnitune.model.adapters import apply_adapters, trainable_summary
from omnitune.model.load import load_processor, load_thinker
from omnitune.model.qlora import quantize_experts
from omnitune.recipe import Recipe, RecipeError
from omnitune.run_dir import RunDir
from omnitune.train.trainer import KeepActivations, MetricsLog, OmniTrainer


@dataclass
class TrainResult:
    run: RunDir
    global_step: int
    train_loss: float | None
    eval_loss: float | None


def absolute_recipe(recipe: Recipe) -> Recipe:
    """The recipe with every path made absolute, so RUN/recipe.yaml means the same from anywhere."""
    r = recipe.model_copy(deep=True)
    r.output_dir = str(recipe.out)
    for key in ("train", "eval", "cache_dir"):
        value = getattr(r.data, key)
        if value is not None:
            setattr(r.data, key, str(recipe.resolve(value)))
    if recipe.model.path != "tiny" and Path(recipe.model.path).expanduser().exists():
        r.model.path = str(Path(recipe.model.path).expanduser().resolve())
    return r


def router_aux_coef(recipe: Recipe, thinker: torch.nn.Module) -> float:
    """The balance-loss coefficient, used only when router weights train (LoRA on router, or full FT of the LLM)."""
    trains_router = ("router" in recipe.adapter.targets if recipe.adapter.method != "full"
                     else not recipe.adapter.freeze_llm)
    if not trains_router:
        return 0.0
    coef = recipe.train.router_aux_coef
    return float(coef if coef is not None else thinker.config.text_config.router_aux_loss_coef)


def world_size() -> int:
    """Processes in this launch (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def uses_cuda_graphs(recipe: Recipe) -> bool:
    """CUDA graphs need a step without RNG state to restore and without an fp16 grad scaler (train/graphed_step.py),
    and one process: DDP's gradient all-reduce is driven from the host during the backward."""
    t = recipe.train
    return (t.cuda_graphs and torch.cuda.is_available() and t.precision != "fp16" and world_size() == 1
            and (recipe.adapter.method == "full" or recipe.adapter.dropout == 0))


def checkpoint_kwargs(recipe: Recipe) -> dict:
    # a graph capture cannot save/restore the CUDA RNG state; with no dropout there is nothing to restore
    return {"use_reentrant": False, "preserve_rng_state": not uses_cuda_graphs(recipe)}


def trains_a_tower(recipe: Recipe) -> bool:
    """Whether an audio/vision component trains, which only some batches (those with that modality) reach."""
    a = recipe.adapter
    return not (a.freeze_audio_tower and a.freeze_audio_projector and a.freeze_vision_tower and a.freeze_vision_merger)


def training_arguments(recipe: Recipe, run: RunDir, has_eval: bool) -> TrainingArguments:
    t = recipe.train
    eval_steps = t.eval_steps or t.save_steps
    report = ["wandb"] if recipe.log.wandb else []
    if recipe.log.wandb:
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            raise RecipeError("log.wandb=true needs the wandb package: pip install 'omnitune[wandb]'")
        os.environ.setdefault("WANDB_PROJECT", recipe.log.wandb_project)
    return TrainingArguments(
        output_dir=str(run.checkpoints), run_name=recipe.name, seed=t.seed, data_seed=t.seed,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio, num_train_epochs=t.epochs, max_steps=t.max_steps,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        bf16=t.precision == "bf16", fp16=t.precision == "fp16",
        # selective checkpointing is switched on by enable_checkpointing (its context_fn is not serialisable)
        activation_checkpointing=t.gradient_checkpointing and t.checkpoint_policy == "full",
        activation_checkpointing_kwargs=checkpoint_kwargs(recipe) if t.gradient_checkpointing else None,
        logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None, prediction_loss_only=True,
        remove_unused_columns=False, report_to=report, dataloader_num_workers=0,
        disable_tqdm=False, use_cpu=not torch.cuda.is_available(),
        # DDP: towers trained in full (modules_to_save) get no gradient from batches without their modality
        ddp_find_unused_parameters=trains_a_tower(recipe) if world_size() > 1 else None,
    )


def print_summary(model: torch.nn.Module, console: Console) -> None:
    table = Table(title="parameters", show_edge=False)
    for col in ("component", "trainable", "total"):
        table.add_column(col, justify="right" if col != "component" else "left")
    rows = trainable_summary(model)
    for comp, tr, tot in rows:
        table.add_row(comp, f"{tr:,}", f"{tot:,}")
    tr_all, tot_all = sum(r[1] for r in rows), sum(r[2] for r in rows)
    table.add_row("all", f"{tr_all:,}", f"{tot_all:,} ({100 * tr_all / max(tot_all, 1):.3f}% trainable)")
    console.print(table)


def micro_batch_tokens(recipe: Recipe) -> int:
    """The most tokens one micro-batch can hold (padded or packed), rounded up to the CUDA-graph bucket."""
    tokens = recipe.train.batch_size * recipe.data.max_length
    if uses_cuda_graphs(recipe):
        tokens = -(-tokens // recipe.train.graph_bucket) * recipe.train.graph_bucket
    return tokens


def enable_selective_checkpointing(model: torch.nn.Module, recipe: Recipe) -> None:
    """Per-layer checkpointing whose recompute reuses the saved attention outputs (kernels/checkpointing.py)."""
    t = recipe.train
    if not (t.gradient_checkpointing and t.checkpoint_policy == "selective"):
        return
    from omnitune.kernels.checkpointing import selective_checkpoint_context

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.activation_checkpointing_enable(
        activation_checkpointing_kwargs={**checkpoint_kwargs(recipe), "context_fn": selective_checkpoint_context()})


def enable_fast_paths(model: torch.nn.Module, recipe: Recipe, console: Console) -> None:
    """With `model.experts: omnitune`: expert and linear LoRA through the fused paths (kernels/), reading PEFT's own
    adapter tensors; on CUDA also the compiled RMSNorm/SwiGLU/RoPE and the fused router top-k."""
    if recipe.model.experts != "omnitune":
        return
    from omnitune import kernels

    if recipe.adapter.method != "full":
        counts = kernels.enable_fast_lora(model)
        console.print(f"fast LoRA paths: {counts}")
    if torch.cuda.is_available():
        kernels.enable_fused_norms(model)
        kernels.enable_fused_rope()
        kernels.enable_fused_router(model)


# Sections a resumed run may change: how long and how it trains and logs, not what it trains on or adapts.
RESUMABLE_CHANGES = ("train", "log", "name")
RESUMABLE_KEYS = ("data.workers", "data.cache_dir")  # where and how fast data is prepared, not what it is


def check_same_run(run: RunDir, recipe: Recipe) -> None:
    """--resume continues the checkpoint's run: its model, data and adapter must be the recipe's."""
    if not run.recipe_file.exists():
        return
    before, now = run.recipe().dump(), recipe.dump()
    changed = sorted(f"{sec}.{k}" for sec in now if sec not in RESUMABLE_CHANGES and isinstance(now[sec], dict)
                     for k in now[sec] if before.get(sec, {}).get(k) != now[sec][k]
                     and f"{sec}.{k}" not in RESUMABLE_KEYS)
    if changed:
        raise RecipeError(f"--resume: the recipe differs from the run's ({run.recipe_file}) in {', '.join(changed)}; "
                          "resume with the same model, data and adapter, or train into a new output_dir")


def train(recipe: Recipe, resume: bool = False, console: Console | None = None) -> TrainResult:
    """Train as the recipe says; with `resume`, continue from the newest checkpoint of the same run."""
    from omnitune.data.cache import load_or_prepare
    from omnitune.data.collate import OmniCollator

    if world_size() > 1 and recipe.distributed.strategy != "ddp":
        raise RecipeError(f"launched as {world_size()} processes (torchrun / accelerate launch): set "
                          "distributed.strategy=ddp to train data parallel, or launch one process")
    # joins the process group under torchrun (a no-op for one process); cpu= as the Trainer will ask for it, or
    # accelerate takes a CPU launch for a single process and every process believes it is the main one
    state = PartialState(cpu=not torch.cuda.is_available())
    console = console or Console()
    if not state.is_main_process:
        console = Console(quiet=True)  # one process reports
    recipe = absolute_recipe(recipe)
    run = RunDir(recipe.out)
    last = get_last_checkpoint(str(run.checkpoints)) if run.checkpoints.is_dir() else None
    if resume and last is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {run.checkpoints}")
    if not resume and last is not None:
        raise FileExistsError(f"{run.root} already holds checkpoints ({Path(last).name}): pass --resume to "
                              f"continue, or choose another output_dir (--set output_dir=...)")
    if resume:
        check_same_run(run, recipe)
    if state.is_main_process:
        run.save_recipe(recipe)

    with state.main_process_first():  # the main process builds what is missing (tiny model, data cache) first
        processor = load_processor(recipe.model)
        train_ds, eval_ds = load_or_prepare(recipe, processor, console=console)
    set_seed(recipe.train.seed)  # adapter init draws from the global RNG: same seed, same run (every process)
    qlora = recipe.adapter.method == "qlora"
    gpu = torch.cuda.is_available()
    device = f"cuda:{state.local_process_index}" if gpu else "cpu"
    # QLoRA loads on the host and quantizes the experts onto the GPU one module at a time: the bf16 experts
    # (~54 GiB for the real Thinker) never have to fit on the card
    thinker = load_thinker(recipe.model, device_map={"": device} if gpu and not qlora else None)
    model = apply_adapters(thinker, recipe.adapter)
    if qlora:
        before, after = quantize_experts(model, device=device if gpu else None)
        model.to(device)
        console.print(f"QLoRA: expert weights in 4-bit NF4, {before / 2**30:.2f} GiB -> {after / 2**30:.2f} GiB")
    enable_fast_paths(model, recipe, console)
    enable_selective_checkpointing(model, recipe)
    print_summary(model, console)

    args = training_arguments(recipe, run, has_eval=eval_ds is not None)
    callbacks = [MetricsLog(run.metrics)]
    if recipe.train.gradient_checkpointing and recipe.train.uncheckpointed_layers:
        callbacks.append(KeepActivations(recipe.train.uncheckpointed_layers, micro_batch_tokens(recipe),
                                         report=console.print))
    if recipe.log.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run.logs))))
    trainer = OmniTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=OmniCollator(processor.tokenizer.pad_token_id, recipe.train.loss_weights,
                                   packing=recipe.data.packing),
        callbacks=callbacks, router_aux_coef=router_aux_coef(recipe, thinker),
        graph_bucket=recipe.train.graph_bucket if uses_cuda_graphs(recipe) else None)
    try:
        out = trainer.train(resume_from_checkpoint=last if resume else None)
    except KeyboardInterrupt:
        newest = get_last_checkpoint(str(run.checkpoints)) if run.checkpoints.is_dir() else None
        console.print("[yellow]interrupted.[/] " + (f"Newest checkpoint: {newest}. Continue with --resume."
                                                    if newest else "No checkpoint was written yet."))
        raise
    summary = trainer.graph_summary()
    if summary:
        console.print(summary)
    eval_loss = trainer.evaluate()["eval_loss"] if eval_ds is not None else None
    if state.is_main_process:
        save_final(model, processor, run, full=recipe.adapter.method == "full")
    state.wait_for_everyone()
    console.print(f"[green]done[/]: {out.global_step} steps, train loss {out.training_loss:.4f}"
                  + (f", eval loss {eval_loss:.4f}" if eval_loss is not None else "") + f" -> {run.root}")
    return TrainResult(run, out.global_step, out.training_loss, eval_loss)


def save_final(model: torch.nn.Module, processor, run: RunDir, full: bool) -> None:
    """RUN/adapter (or RUN/model) and RUN/processor, each written to a temp dir and renamed into place."""
    for target, write in ((run.model if full else run.adapter, model.save_pretrained),
                          (run.processor, processor.save_pretrained)):
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=run.root))
        write(str(tmp))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
