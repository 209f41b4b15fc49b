"""`omnitune train`: recipe -> plan -> data -> model -> trainer -> run directory."""

from __future__ import annotations

import gc
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import TrainingArguments, set_seed
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import get_last_checkpoint

from omnitune.atomic import replace_dir, staging_dir
from omnitune.errors import OmnituneError
from omnitune.model import parts
from omnitune.model.adapters import check_adapter_config, trainable_summary
from omnitune.model.build import build_for_training
from omnitune.model.load import load_full, load_processor, load_thinker
from omnitune.model.speakers import add_speakers, save_speakers
from omnitune.recipe import Recipe, RecipeError
from omnitune.run_dir import RunDir
from omnitune.tokens import pad_id
from omnitune.train.callbacks import KeepActivations, MetricsLog, OffloadTowers, StepStarted
from omnitune.train.distributed import (ShardReport, deepspeed_config, engine_backend, full_trained_state,
                                        process_state, shard)
from omnitune.train.guard import NonFiniteGuard
from omnitune.train.host_layout import HostLayout
from omnitune.train.memory import MemoryEstimate, check_fits
from omnitune.train.objectives import TalkerCodec, ThinkerLM
from omnitune.train.plan import TrainingPlan, make_plan
from omnitune.train.resume import CheckpointError, resumable_checkpoint
from omnitune.train.trainer import OmniTrainer


@dataclass
class TrainResult:
    run: RunDir
    global_step: int
    train_loss: float | None
    eval_loss: float | None
    plan: TrainingPlan | None = None
    memory: MemoryEstimate | None = None


def absolute_recipe(recipe: Recipe) -> Recipe:
    """The recipe with every path made absolute, so RUN/recipe.yaml means the same from anywhere."""
    r = recipe.model_copy(deep=True)
    r.output_dir = str(recipe.out)
    for key in ("train", "eval", "cache_dir"):
        value = getattr(r.data, key)
        if value is not None:
            setattr(r.data, key, str(recipe.resolve(value)))
    if r.distributed.deepspeed_config is not None:
        r.distributed.deepspeed_config = str(recipe.resolve(r.distributed.deepspeed_config))
    if recipe.model.path != "tiny" and Path(recipe.model.path).expanduser().exists():
        r.model.path = str(Path(recipe.model.path).expanduser().resolve())
    return r


def router_aux_coef(recipe: Recipe, thinker: torch.nn.Module) -> float:
    """The balance-loss coefficient, used only when router weights train (LoRA on router, or full FT of the LLM)."""
    if not make_plan(recipe).router_trains:
        return 0.0
    coef = recipe.train.router_aux_coef
    return float(coef if coef is not None else parts.thinker_of(thinker).config.text_config.router_aux_loss_coef)


def training_arguments(recipe: Recipe, run: RunDir, has_eval: bool, plan: TrainingPlan | None = None
                       ) -> TrainingArguments:
    plan = plan or make_plan(recipe)
    t = recipe.train
    eval_steps = t.eval_steps or t.save_steps
    report = ["wandb"] if recipe.log.wandb else []
    if recipe.log.wandb:
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            raise RecipeError("log.wandb=true needs the wandb package: pip install 'omnitune[wandb]'")
        os.environ.setdefault("WANDB_PROJECT", recipe.log.wandb_project)
    ckpt_kwargs = {"use_reentrant": False, "preserve_rng_state": plan.preserve_rng_state}
    return TrainingArguments(
        output_dir=str(run.checkpoints), run_name=recipe.name, seed=t.seed, data_seed=t.seed,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio, num_train_epochs=t.epochs, max_steps=t.max_steps,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        bf16=plan.precision == "bf16", fp16=plan.precision == "fp16",
        # selective checkpointing is switched on by enable_selective_checkpointing (its context_fn is not
        # serialisable)
        activation_checkpointing=plan.gradient_checkpointing and plan.checkpoint_policy == "full",
        activation_checkpointing_kwargs=ckpt_kwargs if plan.gradient_checkpointing else None,
        # no per-step isnan read-back: non-finite steps are caught on the device (train/guard.py)
        logging_steps=t.logging_steps, logging_nan_inf_filter=False,
        train_sampling_strategy="group_by_length" if plan.group_by_length else "random",
        save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None, prediction_loss_only=True,
        remove_unused_columns=False, report_to=report, dataloader_num_workers=0,
        # batches reach the GPU as queued copies from pinned memory: a blocking copy would wait for the previous
        # step's kernels every step, and the host's work after that wait would leave the GPU idle
        dataloader_pin_memory=True,
        # use_configured_state: DeepSpeed on the CPU keeps the process state made for it (process_state)
        accelerator_config={"non_blocking": True, "use_configured_state": engine_backend(plan) is not None},
        # DeepSpeed on a CPU-only machine runs through accelerate's DeepSpeed path with DS_ACCELERATOR=cpu, which
        # accelerate takes only when not told use_cpu (train/distributed.py)
        disable_tqdm=False, use_cpu=plan.hardware.device == "cpu" and not plan.deepspeed,
        deepspeed=deepspeed_config(recipe, plan),
        # DDP: towers trained in full (modules_to_save) get no gradient from batches without their modality
        ddp_find_unused_parameters=plan.unused_parameters if plan.world_size > 1 else None,
    )


def padding_report(lengths: list[int], batch_size: int, plan: TrainingPlan, seed: int = 0) -> str:
    """One line: the share of padding in the padded batches this run makes (one epoch's order drawn as the sampler
    draws it), beside what random order would give."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from omnitune.data.collate import padding_ratio

    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(lengths), generator=generator).tolist()
    multiple = plan.graph_bucket if plan.cuda_graphs else 1
    bucket = f", rounded up to the {multiple}-token graph bucket" if multiple > 1 else ""
    if not plan.group_by_length:
        return f"padding: {100 * padding_ratio(lengths, shuffled, batch_size, multiple):.1f}% of batch tokens{bucket}"
    grouped = get_length_grouped_indices(lengths, batch_size, generator=generator)
    return (f"padding: {100 * padding_ratio(lengths, grouped, batch_size, multiple):.1f}% of batch tokens{bucket} "
            f"(length-grouped; {100 * padding_ratio(lengths, shuffled, batch_size, multiple):.1f}% in random order)")


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


def enable_selective_checkpointing(model: torch.nn.Module, plan: TrainingPlan) -> None:
    """Per-layer checkpointing whose recompute reuses the saved attention outputs (train/checkpointing.py)."""
    if not (plan.gradient_checkpointing and plan.checkpoint_policy == "selective"):
        return
    from omnitune.train.checkpointing import selective_checkpoint_context

    parts.unwrap(model).activation_checkpointing_enable(activation_checkpointing_kwargs={
        "use_reentrant": False, "preserve_rng_state": plan.preserve_rng_state,
        "context_fn": selective_checkpoint_context()})


FULL_MODEL = "Qwen3OmniMoeForConditionalGeneration"

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


def train(recipe: Recipe, resume: bool = False, console: Console | None = None,
          thinker: torch.nn.Module | None = None) -> TrainResult:
    """Train as the recipe says; with `resume`, continue from the newest checkpoint of the same run.

    `thinker`: a model already built (bench/bench_train.py passes random weights at the real widths, which no
    checkpoint on disk holds; for train.objective=talker_codec the full model, bench/bench_talker.py); everything
    else, from the plan to the optimizer, is what `omnitune train` runs."""
    from omnitune.data.cache import load_or_prepare
    from omnitune.data.collate import OmniCollator

    plan = make_plan(recipe)
    speaks = plan.objective == "talker_codec"  # the Talker trains: the full model, the Thinker frozen inside it
    check_adapter_config(recipe.adapter, FULL_MODEL if speaks else "Qwen3OmniMoeThinkerForConditionalGeneration")
    # joins the process group under torchrun (a no-op for one process), as the Trainer will ask for it
    state = process_state(plan)
    console = console or Console()
    if not state.is_main_process:
        console = Console(quiet=True)  # one process reports
    recipe = absolute_recipe(recipe)
    run = RunDir(recipe.out)
    last = get_last_checkpoint(str(run.checkpoints)) if run.checkpoints.is_dir() else None
    if resume and last is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {run.checkpoints}")
    if resume:
        last = str(resumable_checkpoint(run.checkpoints, console.print))
    if not resume and last is not None:
        raise FileExistsError(f"{run.root} already holds checkpoints ({Path(last).name}): pass --resume to "
                              f"continue, or choose another output_dir (--set output_dir=...)")
    if resume:
        check_same_run(run, recipe)
    if state.is_main_process:
        run.save_recipe(recipe)
    console.print("[bold]plan[/bold]\n  " + "\n  ".join(plan.lines()), highlight=False)
    if speaks:  # train/memory.py models the Thinker's training; the Talker's is small beside the frozen Thinker
        memory = None
        console.print("  memory estimate: not modelled for train.objective=talker_codec", highlight=False)
    else:
        with state.main_process_first():  # reading the config may build the tiny model: the main process does it
            memory = check_fits(recipe, plan, config=thinker.config if thinker is not None else None, model=thinker,
                                report=lambda line: console.print("  " + line, highlight=False))

    with state.main_process_first():  # the main process builds what is missing (tiny model, data cache) first
        processor = load_processor(recipe.model)
        train_ds, eval_ds = load_or_prepare(recipe, processor, console=console)
    if not plan.packing:
        console.print(padding_report(train_ds.lengths, recipe.train.batch_size, plan), highlight=False)
    set_seed(recipe.train.seed)  # adapter init draws from the global RNG: same seed, same run (every process)
    if thinker is None:
        # QLoRA loads on the host and quantizes the experts onto the GPU one module at a time: the bf16 experts
        # (~54 GiB for the real Thinker) never have to fit on the card
        on_device = plan.hardware.device == "cuda" and recipe.adapter.method != "qlora"
        load = load_full if speaks else load_thinker
        thinker = load(recipe.model, device_map={"": plan.hardware.device_str} if on_device else None)
    if plan.encoder_cache:  # the frozen towers run once here; training reads their stored outputs
        from omnitune.data.encoder_cache import with_encoder_outputs

        with state.main_process_first():  # one process encodes, the others find its outputs
            train_ds, eval_ds = with_encoder_outputs([train_ds, eval_ds], thinker, plan.hardware.device_str, console)
    speakers = add_speakers(thinker, dataset_speakers(train_ds), recipe.talker.new_speaker_init) if speaks else {}
    adapter = recipe.adapter.model_copy(update={"lora_dtype": plan.lora_dtype})  # the plan may keep LoRA fp32
    model = build_for_training(thinker, adapter, fast_paths=plan.fast_paths, device=plan.hardware.device_str,
                               report=console.print, offload_experts=plan.offload_experts,
                               stack="talker" if speaks else "text")
    if plan.encoder_cache and plan.towers_on_host:
        from omnitune.data.encoder_cache import towers_to_host

        towers_to_host(model)
    enable_selective_checkpointing(model, plan)
    print_summary(model, console)
    model = shard(model, plan)  # FSDP2 shards here; ZeRO when the Trainer builds its engine (train/distributed.py)

    args = training_arguments(recipe, run, has_eval=eval_ds is not None, plan=plan)
    metrics = MetricsLog(run.metrics)
    callbacks = [metrics]
    if plan.sharded:
        callbacks.append(ShardReport(plan, report=console.print))
    if plan.offload_towers:
        callbacks.append(OffloadTowers(report=console.print))
    if plan.gradient_checkpointing and plan.uncheckpointed_layers:
        pending = memory.parts["grads"] + memory.parts["optimizer"] if memory is not None else None
        callbacks.append(KeepActivations(plan.uncheckpointed_layers, plan.micro_batch_tokens, report=console.print,
                                         state_bytes=pending))
    if recipe.log.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run.logs))))
    objective = (TalkerCodec(speakers, recipe.talker.speaker, recipe.talker.code_predictor_weight) if speaks else
                 ThinkerLM(router_aux_coef(recipe, thinker), chunked=plan.loss == "chunked"))
    guard = NonFiniteGuard(recipe.train.nonfinite_patience, args.device, recipe.train.lr, report=console.print)
    trainer = OmniTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, objective=objective, plan=plan,
        guard=guard,
        data_collator=OmniCollator(pad_id(processor.tokenizer), recipe.train.loss_weights, packing=plan.packing,
                                   host_counts=True, layout=HostLayout(parts.module(thinker, "backbone"))
                                   if plan.cuda_graphs else None),
        callbacks=callbacks)
    started = StepStarted()
    trainer.add_callback(started)
    try:
        out = trainer.train(resume_from_checkpoint=last if resume else None)
        guard.check(trainer.state.global_step)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
        if not resume or started.yes or isinstance(e, OmnituneError):
            raise
        raise CheckpointError(f"--resume: {last} could not be loaded ({type(e).__name__}: {str(e)[:300]}); "
                              f"move it out of {run.checkpoints} to resume from the one before") from e
    except KeyboardInterrupt:
        newest = get_last_checkpoint(str(run.checkpoints)) if run.checkpoints.is_dir() else None
        console.print("[yellow]interrupted.[/] " + (f"Newest checkpoint: {newest}. Continue with --resume."
                                                    if newest else "No checkpoint was written yet."))
        raise
    summary = trainer.graph_summary()
    if summary:
        console.print(summary)
    eval_loss = final_eval_loss(trainer) if eval_ds is not None else None
    full = recipe.adapter.method == "full"
    weights = full_trained_state(model, plan, trainable_only=not full)  # None where every process holds them
    if state.is_main_process:
        save_final(model, processor, run, full=full, state_dict=weights)
        if speaks:
            save_speakers(speakers, run.speakers)
        if recipe.talker.preserve_speech:
            from omnitune.train.speech_preserve import preserve_speech

            del trainer, model, thinker  # the Thinker adapter is on disk: one full model in memory from here
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            preserve_speech(recipe, plan, train_ds, eval_ds, processor, report=console.print)
    state.wait_for_everyone()
    train_loss = metrics.run_loss() if state.is_main_process else None
    train_loss = out.training_loss if train_loss is None else train_loss
    console.print(f"[green]done[/]: {out.global_step} steps, train loss {train_loss:.4f} (mean over the run's "
                  "steps)" + (f", eval loss {eval_loss:.4f} (modality-weighted, over the eval set)"
                              if eval_loss is not None else "") + f" -> {run.root}")
    return TrainResult(run, out.global_step, train_loss, eval_loss, plan, memory)


def dataset_speakers(dataset) -> list[str]:
    """The voices a speech dataset names (records without `speaker` speak as talker.speaker)."""
    return sorted({s["speaker"] for s in (dataset[i] for i in range(len(dataset))) if s.get("speaker")})


def final_eval_loss(trainer: OmniTrainer) -> float:
    """The eval loss of the final weights: the one the trainer logged at the last step, else a new evaluation
    (evaluating again would log the same step's eval_loss twice)."""
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry and entry.get("step") == trainer.state.global_step:
            return entry["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def save_final(model: torch.nn.Module, processor, run: RunDir, full: bool,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """RUN/adapter (or RUN/model) and RUN/processor, each written to a temp dir and renamed into place.
    `state_dict`: the weights gathered from a sharded run (train/distributed.py), written as one process's."""
    def write_model(path: str) -> None:
        model.save_pretrained(path, **({} if state_dict is None else {"state_dict": state_dict}))

    for target, write in ((run.model if full else run.adapter, write_model),
                          (run.processor, processor.save_pretrained)):
        tmp = staging_dir(run.root, f".{target.name}-")
        write(str(tmp))
        replace_dir(tmp, target)
