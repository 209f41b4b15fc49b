"""The CUDA-graph micro-step (train/graphed_step.py): its eager prefix (embeddings + audio and vision merge, M-RoPE
positions, deepstack, mask, bucket padding) and static loss must give the eager trainer's loss and gradients. On CPU
GraphedGrads runs the same function eagerly, so these tests check everything but the capture itself (bench/ checks
that on the GPU)."""

import json
from dataclasses import replace

import pytest
import torch
from transformers import TrainingArguments

from omnitune.data.collate import OmniCollator
from omnitune.data.synthetic import make_demo_dataset
from omnitune.recipe import load_recipe
from omnitune.train.cuda_graph import GraphCaptureError
from omnitune.train.graphed_step import MASK_ARG, MASKED_SDPA_BACKENDS, GraphedTrainStep, pad_to_bucket, trained_rows
from omnitune.train.objectives import PACKED_KEYS, ThinkerLM, packed_position_ids
from omnitune.train.plan import make_plan
from omnitune.train.trainer import OmniTrainer

TEXT_ONLY = {"conversations": [{"role": "user", "content": "Name a warm colour."},
                               {"role": "assistant", "content": "red"}]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Audio, image, video and text-only samples and the tiny Thinker with non-zero LoRA on attention and experts,
    everything before the decoder frozen."""
    from omnitune.data.cache import load_or_prepare
    from omnitune.model.adapters import apply_adapters
    from omnitune.model.load import load_processor, load_thinker

    data = tmp_path_factory.mktemp("data")
    train_file, eval_file = make_demo_dataset(data, n_train=6, n_eval=2, seed=5)
    with train_file.open("a") as f:
        f.write(json.dumps(TEXT_ONLY) + "\n")
    recipe = load_recipe("demo", [f"data.train={train_file}", f"data.eval={eval_file}",
                                  f"output_dir={tmp_path_factory.mktemp('run')}", "data.workers=1",
                                  "adapter.targets=[attention,experts]", "adapter.train=[]"])
    processor = load_processor(recipe.model)
    train_ds, _ = load_or_prepare(recipe, processor)
    samples = [train_ds[i] for i in range(len(train_ds))]
    assert any("audio" in s["modalities"] for s in samples) and any("vision" in s["modalities"] for s in samples)
    assert any("pixel_values" in s for s in samples) and any("pixel_values_videos" in s for s in samples)
    torch.manual_seed(0)
    model = apply_adapters(load_thinker(recipe.model), recipe.adapter)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # LoRA starts as a no-op (B = 0): make it change the forward
                p.normal_(0, 0.05)
    collate = {packing: OmniCollator(processor.tokenizer.pad_token_id, recipe.train.loss_weights, packing=packing)
               for packing in (False, True)}
    return samples, model, collate


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def eager_loss_and_grads(model, batch, tmp_path):
    trainer = OmniTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                          objective=ThinkerLM())
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.detach(), grads_of(model)


def graphed_loss_and_grads(model, batch, bucket):
    thinker = model.base_model.model
    step = GraphedTrainStep(thinker, [p for p in model.parameters() if p.requires_grad], bucket=bucket)
    model.zero_grad(set_to_none=True)
    batch = dict(batch)
    position_ids = None
    if "seq_lengths" in batch:
        position_ids = packed_position_ids(step.backbone, batch, *[batch.pop(k) for k in PACKED_KEYS])
    loss = step(batch, position_ids, None)
    return loss.detach(), grads_of(model)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("bucket", [16, 512])
def test_graphed_step_gives_the_eager_loss_and_lora_grads(setup, tmp_path, packing, bucket):
    samples, model, collate = setup
    model.train()
    batch = collate[packing](samples)
    assert bucket == 16 or batch["input_ids"].shape[1] < bucket  # 512: most of the row is bucket padding
    loss_e, g_e = eager_loss_and_grads(model, batch, tmp_path)
    loss_g, g_g = graphed_loss_and_grads(model, batch, bucket)
    torch.testing.assert_close(loss_g, loss_e, rtol=1e-5, atol=1e-6)
    assert g_g.keys() == g_e.keys() and any("experts" in n for n in g_e) and any("q_proj" in n for n in g_e)
    for name in g_e:
        torch.testing.assert_close(g_g[name], g_e[name], rtol=1e-4, atol=1e-6, msg=name)


def test_graphed_step_accumulates_into_existing_grads_like_backward(setup, tmp_path):
    samples, model, collate = setup
    batch = collate[False](samples)
    _, once = eager_loss_and_grads(model, batch, tmp_path)
    thinker = model.base_model.model
    step = GraphedTrainStep(thinker, [p for p in model.parameters() if p.requires_grad], bucket=32)
    step(dict(batch), None, None)  # on top of the grads eager_loss_and_grads left in .grad
    for name, g in grads_of(model).items():
        torch.testing.assert_close(g, 2 * once[name], rtol=1e-4, atol=1e-6, msg=name)


def test_graphed_step_says_why_a_batch_runs_eagerly(setup, monkeypatch):
    samples, model, collate = setup
    thinker = model.base_model.model
    params = [p for p in model.parameters() if p.requires_grad]
    step = GraphedTrainStep(thinker, params)
    batch = collate[False](samples)
    assert step.eager_reason(batch) == "the batch is not on a CUDA device"  # CPU tensors: nothing to capture
    # the rules themselves, with the device checks answered as on a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    batch["input_ids"] = type("OnGpu", (), {"is_cuda": True})()
    assert step.eager_reason(batch) is None
    assert step.eager_reason({**batch, "pixel_values": torch.zeros(1)}) is None  # media batches replay too
    projector = next(thinker.model.audio_tower.parameters())
    projector.requires_grad_(True)
    try:
        assert "before the decoder" in GraphedTrainStep(thinker, params).eager_reason(batch)
    finally:
        projector.requires_grad_(False)


def test_right_padding_and_single_packed_samples_need_no_mask_but_left_padding_and_packing_do(setup):
    samples, model, collate = setup
    thinker = model.base_model.model
    step = GraphedTrainStep(thinker, [p for p in model.parameters() if p.requires_grad], bucket=64)

    def graph_args(batch):
        batch = dict(batch)
        pos = packed_position_ids(step.backbone, batch, *[batch.pop(k) for k in PACKED_KEYS]) \
            if "seq_lengths" in batch else None
        return step.prepare(batch, pos, None)

    padded = collate[False](samples)
    assert len(graph_args(padded)) == MASK_ARG  # no mask input: causal attention only
    assert len(graph_args(collate[True](samples[:1]))) == MASK_ARG  # one packed sample + its tail: still one sample
    assert len(graph_args(collate[True](samples))) == MASK_ARG + 1  # several samples in a row: the block mask
    left = dict(padded, attention_mask=padded["attention_mask"].flip(-1))
    assert not left["attention_mask"].all() and len(graph_args(left)) == MASK_ARG + 1


def test_a_capture_that_fails_with_cudnn_attention_is_retried_without_it(setup, caplog):
    samples, model, collate = setup
    thinker = model.base_model.model
    step = GraphedTrainStep(thinker, [p for p in model.parameters() if p.requires_grad], bucket=64)
    seen = []

    def capture(*args):  # stands in for the capture only: fails whenever SDPA may pick cuDNN, as on the GPU
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        if seen[-1]:
            raise GraphCaptureError("cudaErrorStreamCaptureImplicit")
        return args[-1], ()

    step.graphs = capture
    with caplog.at_level("WARNING"):
        step(collate[False](samples), None, None)
    assert seen == [True, False] and step.sdpa_backends == MASKED_SDPA_BACKENDS
    assert "capturing without it" in caplog.text
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the restriction lasted only for the call
    packed = dict(collate[True](samples))
    pos = packed_position_ids(step.backbone, packed, *[packed.pop(k) for k in PACKED_KEYS])

    def always_fails(*args):
        raise GraphCaptureError("no")

    step.graphs = always_fails
    with pytest.raises(GraphCaptureError):  # masked: already without cuDNN, so the failure is the caller's
        step(packed, pos, None)


def test_trainer_reports_how_its_micro_steps_ran(setup, tmp_path):
    samples, model, collate = setup
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2,
                             per_device_train_batch_size=2, save_strategy="no", remove_unused_columns=False,
                             disable_tqdm=True)
    cpu_plan = make_plan(load_recipe("demo"))
    assert not cpu_plan.cuda_graphs and cpu_plan.cuda_graphs_why == "no CUDA device"
    graphs_plan = replace(cpu_plan, cuda_graphs=True, graph_bucket=64)  # as on a GPU, to see the fallback
    trainer = OmniTrainer(model=model, args=args, train_dataset=samples, data_collator=collate[False],
                          objective=ThinkerLM(), plan=graphs_plan)
    trainer.train()
    # on the CPU nothing can be captured: every micro-step ran eagerly, and the line says so and why
    assert trainer.graph_summary() == ("CUDA graphs: 0 captured, 0 micro-steps replayed, 2 eager "
                                       "(the batch is not on a CUDA device)")
    no_graphs = OmniTrainer(model=model, args=args, train_dataset=samples, data_collator=collate[False],
                            objective=ThinkerLM(), plan=cpu_plan)
    assert no_graphs.graph_summary() is None


def test_pad_to_bucket_pads_the_named_dim_only():
    t = torch.arange(6).view(1, 2, 3)
    out = pad_to_bucket(t, 5, -1, dim=-1)
    assert out.shape == (1, 2, 5) and (out[..., 3:] == -1).all() and torch.equal(out[..., :3], t)
    assert pad_to_bucket(t, 3, 0) is t


def test_trained_rows_come_first_in_order_padded_with_ignored_labels():
    labels = torch.tensor([[5, -100, 7, -100, -100, 9], [1, 2, -100, 3, -100, -100]])  # [:, 1:] is what trains
    y = labels[:, 1:].reshape(-1)
    trained = (y != -100).nonzero().squeeze(1)
    rows, row_labels = trained_rows(labels, 4)  # exactly the 4 trained of 10
    assert rows.tolist() == trained.tolist() and row_labels.tolist() == y[trained].tolist()
    rows, row_labels = trained_rows(labels, 6)  # two padding rows: distinct, ignored
    assert rows.tolist()[:4] == trained.tolist() and len(set(rows.tolist())) == 6
    assert (row_labels[4:] == -100).all()


def test_head_rows_round_up_to_the_bucket_and_keep_at_most_two_sizes_per_shape(setup):
    samples, model, collate = setup
    step = GraphedTrainStep(model.base_model.model, [], bucket=16)
    shape = (2, 65)  # 128 positions after the shift
    assert step.head_rows(shape, 20) == 32  # the first batch of this shape sets its reduced size
    assert step.head_rows(shape, 3) == 32  # fits: the same graph
    assert step.head_rows(shape, 40) == 128  # does not: every position (the second and last size)
    assert step.head_rows((1, 65), 0) == 16  # another shape, its own size; nothing trains: one bucket
    assert step.head_rows((1, 9), 5) == 8  # capped at the positions there are


def test_graphed_step_projects_only_the_trained_positions_onto_the_vocabulary(setup, monkeypatch):
    """The head and cross-entropy see the trained positions (padded up to the bucket), not the whole padded row."""
    import omnitune.train.graphed_step as graphed_step

    samples, model, collate = setup
    thinker = model.base_model.model
    seen = []
    ce = graphed_step.chunked_linear_cross_entropy
    monkeypatch.setattr(graphed_step, "chunked_linear_cross_entropy",
                        lambda h, w, y, **kw: seen.append(h.shape[0]) or ce(h, w, y, **kw))
    batch = collate[False](samples)
    step = GraphedTrainStep(thinker, [p for p in model.parameters() if p.requires_grad], bucket=16)
    step(dict(batch), None, None)
    trained = int((batch["labels"][:, 1:] != -100).sum())
    padded_positions = batch["labels"].shape[0] * (-(-batch["labels"].shape[1] // 16) * 16 - 1)
    assert seen == [-(-trained // 16) * 16] and seen[0] < padded_positions



def test_the_collators_host_counts_give_the_same_graph_inputs_without_reading_the_gpu(setup):
    """With `trained_tokens` and `right_padded` from the collator the prefix reads nothing back (on a GPU, a wait
    for the previous step); the graph's inputs must be exactly those of the read-back path."""
    samples, model, _ = setup
    thinker = model.base_model.model
    step = GraphedTrainStep(thinker, [p for p in model.parameters() if p.requires_grad], bucket=64)
    for packing in (False, True):
        plain = OmniCollator(0, {"text": 1.0, "audio": 0.8, "vision": 0.9}, packing=packing)(samples)
        counted = OmniCollator(0, {"text": 1.0, "audio": 0.8, "vision": 0.9}, packing=packing,
                               host_counts=True)(samples)
        assert counted["trained_tokens"] == int((plain["labels"][:, 1:] != -100).sum())
        args = []
        for batch in (plain, counted):
            batch = dict(batch)
            pos = packed_position_ids(step.backbone, batch, *[batch.pop(k) for k in PACKED_KEYS]) \
                if packing else None
            args.append(step.prepare(batch, pos, None))
        assert len(args[0]) == len(args[1])
        for a, b in zip(*args):
            assert torch.equal(a, b)
