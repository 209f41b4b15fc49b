"""The encoder-output cache (data/encoder_cache.py): the frozen towers run once, batches carry their stored
outputs, and the loss and LoRA gradients equal those of the towers running in the step (tiny model, CPU)."""

import pytest
import torch
from transformers import TrainingArguments

from omnitune.data.collate import OmniCollator
from omnitune.data.encoder_cache import encode_dataset, weights_fingerprint, with_encoder_outputs
from omnitune.data.synthetic import make_demo_dataset
from omnitune.model.encoded_inputs import ENCODED_KEYS
from omnitune.recipe import RecipeError, load_recipe
from omnitune.train.objectives import ThinkerLM
from omnitune.train.plan import Hardware, make_plan
from omnitune.train.trainer import OmniTrainer

CPU = Hardware("cpu", "cpu", None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Audio, image and video samples (two-round records mix them) and the tiny Thinker with non-zero LoRA."""
    from omnitune.data.cache import load_or_prepare
    from omnitune.model.adapters import apply_adapters
    from omnitune.model.load import load_processor, load_thinker

    data = tmp_path_factory.mktemp("data")
    train_file, eval_file = make_demo_dataset(data, n_train=8, n_eval=2, seed=3)
    recipe = load_recipe("demo", [f"data.train={train_file}", f"data.eval={eval_file}",
                                  f"output_dir={tmp_path_factory.mktemp('run')}", "data.workers=1",
                                  "adapter.targets=[attention,experts]", "adapter.train=[]"])
    processor = load_processor(recipe.model)
    train_ds, _ = load_or_prepare(recipe, processor)
    torch.manual_seed(0)
    thinker = load_thinker(recipe.model)
    model = apply_adapters(thinker, recipe.adapter)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # LoRA starts as a no-op (B = 0): make it change the forward
                p.normal_(0, 0.05)
    (cached,) = with_encoder_outputs([train_ds], model, "cpu")
    collate = OmniCollator(processor.tokenizer.pad_token_id, recipe.train.loss_weights)
    return recipe, train_ds, cached, model, collate


def loss_and_grads(model, batch, tmp_path):
    trainer = OmniTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                          objective=ThinkerLM())
    model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cached_samples_carry_tower_outputs_instead_of_tower_inputs(setup):
    _, raw, cached, _, _ = setup
    mods = set()
    for i in range(len(raw)):
        r, c = raw[i], cached[i]
        mods.update(r["modalities"])
        assert not {"input_features", "pixel_values", "pixel_values_videos"} & set(c)
        assert torch.equal(r["input_ids"], c["input_ids"]) and torch.equal(r["labels"], c["labels"])
        if "input_features" in r:
            assert c["audio_embeds"].shape[0] == int((r["input_ids"] == 151675).sum())
            assert torch.equal(c["feature_attention_mask"], r["feature_attention_mask"])
        for kind, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            if pixels in r:
                assert c[f"{kind}_deepstack"].shape[:1] == c[f"{kind}_embeds"].shape[:1]
                assert c[f"{kind}_deepstack"].dim() == 3
    assert {"audio", "vision"} <= mods


@pytest.mark.parametrize("rows", [[0, 1, 2], [3], [4, 5, 6, 7]])
def test_losses_and_grads_equal_the_towers_running_in_the_step(setup, tmp_path, rows):
    _, raw, cached, model, collate = setup
    batch_raw = collate([raw[i] for i in rows])
    batch_cached = collate([cached[i] for i in rows])
    assert any(k in batch_cached for k in ENCODED_KEYS) and "pixel_values" not in batch_cached
    loss_r, g_r = loss_and_grads(model, batch_raw, tmp_path)
    loss_c, g_c = loss_and_grads(model, batch_cached, tmp_path)
    torch.testing.assert_close(loss_c, loss_r, rtol=1e-5, atol=1e-6)
    assert g_c.keys() == g_r.keys() and g_r
    for name in g_r:
        torch.testing.assert_close(g_c[name], g_r[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_store_is_reused_and_other_weights_are_encoded_again(setup):
    _, raw, cached, model, _ = setup
    folder = cached.encoded
    assert folder.name == f"encoded-{weights_fingerprint(model)}"
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert encode_dataset(model, raw) == folder and (folder / "manifest.json").stat().st_mtime_ns == stamp
    tower = model.base_model.model.model.audio_tower
    w = next(tower.parameters())
    before = w.detach().clone()
    with torch.no_grad():
        w.add_(1e-3)
    try:
        assert weights_fingerprint(model) != folder.name.split("-")[1]
    finally:
        with torch.no_grad():
            w.copy_(before)
    damaged = folder / "damaged"
    damaged.write_bytes(b"damaged")
    damaged.replace(folder / "shard-00000.pt")  # a new file: the fixture's memory map keeps the old one
    assert encode_dataset(model, raw) == folder  # checked before use: encoded again
    assert torch.equal(cached.with_encoded(folder)[0]["input_ids"], raw[0]["input_ids"])


def test_the_plan_turns_the_cache_on_when_the_towers_are_frozen():
    def plan(*o):
        return make_plan(load_recipe("instruct", list(o)), CPU)

    assert plan().encoder_cache and any(line.startswith("encoder cache: on") for line in plan().lines())
    assert not plan("data.encoder_cache=false").encoder_cache
    off = plan("adapter.train=[audio_projector]")
    assert not off.encoder_cache and "a tower trains" in off.encoder_cache_why
    with pytest.raises(RecipeError, match="data.encoder_cache=true needs"):
        plan("adapter.train=[vision_merger]", "data.encoder_cache=true")


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("layout", [False, True])
def test_the_graphed_step_on_stored_outputs_gives_the_eager_loss_of_the_towers(setup, tmp_path, packing, layout):
    """The positions stage of the CUDA-graph step (train/graphed_step.py) on a cached image + video + audio batch,
    with and without the collator's host layout (train/host_layout.py: positions and media token positions, so
    nothing is read back): the same loss and LoRA gradients as the eager step running the towers (GraphedGrads runs
    eagerly on a CPU)."""
    from omnitune.train.graphed_step import GraphedTrainStep
    from omnitune.train.host_layout import HostLayout
    from omnitune.train.objectives import PACKED_KEYS, packed_position_ids

    recipe, raw, cached, model, plain = setup
    rows = list(range(len(raw)))
    thinker = model.base_model.model
    loss_r, g_r = loss_and_grads(model, plain([raw[i] for i in rows]), tmp_path)
    step = GraphedTrainStep(thinker, [p for p in model.parameters() if p.requires_grad], bucket=64)
    collate = OmniCollator(plain.pad_token_id, recipe.train.loss_weights, packing=packing,
                           layout=HostLayout(step.backbone) if layout else None)
    batch = collate([cached[i] for i in rows])
    assert batch["image_deepstack"].shape[1] >= 1 and "video_embeds" in batch and "audio_embeds" in batch
    assert ("image_index" in batch and "position_ids" in batch) == layout
    position_ids = batch.pop("position_ids", None)
    if packing:
        packed = [batch.pop(k) for k in PACKED_KEYS]
        position_ids = packed_position_ids(step.backbone, batch, *packed) if position_ids is None else position_ids
    merged = []
    merge_at = step._merge_at
    step._merge_at = lambda inputs: merged.append(1) or merge_at(inputs)
    args = step.prepare(dict(batch), position_ids, None)
    assert bool(merged) == layout  # the read-back-free merge runs where the collator gave the positions
    assert args[7].shape[:1] == batch["image_deepstack"].shape[1:2]  # the dense deepstack [layers, B, L, H]
    assert args[7].shape[1:3] == args[0].shape[:2]
    model.zero_grad(set_to_none=True)
    loss_g = step(dict(batch), position_ids, None).detach()
    g_g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(loss_g, loss_r, rtol=1e-5, atol=1e-6)
    for name in g_r:
        torch.testing.assert_close(g_g[name], g_r[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_host_layout_gives_the_forwards_own_positions(setup):
    """The collator's M-RoPE positions (get_rope_index on the host) are the ones the Thinker's forward computes."""
    from omnitune.train.graphed_step import GraphedTrainStep, decoder_inputs
    from omnitune.train.host_layout import HostLayout

    recipe, raw, cached, model, plain = setup
    step = GraphedTrainStep(model.base_model.model, [p for p in model.parameters() if p.requires_grad])
    batch = plain([raw[i] for i in range(len(raw))])
    host = HostLayout(step.backbone)(batch)
    staged = decoder_inputs(step.backbone, step.language_model, batch, None)
    assert torch.equal(host["position_ids"], staged["position_ids"])
    assert host["position_ids"][:, :, -1].max() < batch["input_ids"].shape[1]  # video/image rows compress positions
