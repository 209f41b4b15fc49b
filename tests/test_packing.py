"""Padding-free packing (data.packing): a packed row trains exactly like the padded batch of the same samples."""

import json

import pytest
import torch

from omnitune.data.collate import OmniCollator
from omnitune.data.synthetic import make_demo_dataset
from omnitune.recipe import load_recipe
from omnitune.train.loss import token_losses, weighted_loss
from omnitune.train.objectives import PACKED_KEYS, ThinkerLM, packed_position_ids
from omnitune.train.run import train
from model_helpers import logged_losses

TEXT_ONLY = {"conversations": [{"role": "user", "content": "Name a warm colour."},
                               {"role": "assistant", "content": "red"}]}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    train_file, eval_file = make_demo_dataset(tmp_path_factory.mktemp("data"), n_train=5, n_eval=2, seed=3)
    with train_file.open("a") as f:
        f.write(json.dumps(TEXT_ONLY) + "\n")
    return train_file, eval_file


def small_recipe(demo_data, out, *extra):
    """The demo recipe: video with its audio track (use_audio_in_video), video_fps 4 (fractional M-RoPE times)."""
    train_file, eval_file = demo_data
    return load_recipe("demo", [f"data.train={train_file}", f"data.eval={eval_file}", f"output_dir={out}",
                                "data.workers=1", "log.tensorboard=false", *extra])


@pytest.fixture(scope="module")
def setup(demo_data, tmp_path_factory):
    """The six training samples (audio, image, video+audio, two rounds, text only) and the tiny Thinker with
    non-zero LoRA on attention."""
    from omnitune.data.cache import load_or_prepare
    from omnitune.model.adapters import apply_adapters
    from omnitune.model.load import load_processor, load_thinker

    recipe = small_recipe(demo_data, tmp_path_factory.mktemp("run"), "adapter.targets=[attention]")
    processor = load_processor(recipe.model)
    train_ds, _ = load_or_prepare(recipe, processor)
    samples = [train_ds[i] for i in range(len(train_ds))]
    torch.manual_seed(0)
    model = apply_adapters(load_thinker(recipe.model), recipe.adapter)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # LoRA starts as a no-op (B = 0): make it change the forward and get grads
                p.normal_(0, 0.05)
    weights = recipe.train.loss_weights
    collate = {packing: OmniCollator(processor.tokenizer.pad_token_id, weights, packing=packing)
               for packing in (False, True)}
    return samples, model, collate


def test_demo_samples_cover_every_modality_and_fractional_video_times(setup):
    samples, _, _ = setup
    modalities = {m for s in samples for m in s["modalities"]}
    assert modalities == {"text", "audio", "vision"}
    assert any(s["use_audio_in_video"] for s in samples)
    assert any("image_grid_thw" in s for s in samples)
    assert any(len(s["modalities"]) == 1 for s in samples)  # the text-only one
    # 2 frames per grid at 4 fps = 0.5 s per grid: M-RoPE times 0 and 6.5, not integers.
    assert any(float(s["video_second_per_grid"][0]) == 0.5 for s in samples if "video_second_per_grid" in s)


def test_packed_batch_is_one_row_of_unpadded_tokens_with_per_sample_counts_and_weights(setup):
    samples, _, collate = setup
    padded, packed = collate[False](samples), collate[True](samples)
    lengths = [len(s["input_ids"]) for s in samples]
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    assert packed["seq_lengths"].tolist() == lengths
    assert torch.equal(packed["input_ids"][0], torch.cat([s["input_ids"] for s in samples]))
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    assert (packed["labels"][0, starts] == -100).all()
    assert packed["image_counts"].tolist() == [s["image_grid_thw"].shape[0] if "image_grid_thw" in s else 0
                                                for s in samples]
    assert packed["video_counts"].sum() == padded["video_grid_thw"].shape[0]
    assert packed["audio_counts"].sum() == padded["input_features"].shape[0]
    for key in ("input_features", "feature_attention_mask", "pixel_values", "image_grid_thw",
                "pixel_values_videos", "video_grid_thw", "video_second_per_grid", "use_audio_in_video"):
        assert torch.equal(torch.as_tensor(packed[key]), torch.as_tensor(padded[key])), key
    assert torch.equal(packed["sample_weight"][0], padded["sample_weight"].repeat_interleave(torch.tensor(lengths)))


def test_per_token_weights_of_a_packed_row_equal_per_sample_weights_of_the_padded_batch():
    per_token = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    labels = torch.tensor([[0, 5, 5, -100], [0, 5, -100, -100]])
    w = torch.tensor([0.5, 2.0])
    packed_labels = torch.tensor([[0, 5, 5, -100, 5]])  # row 1's first label is -100 in a packed row
    packed_losses = torch.tensor([[1.0, 2.0, 0.0, 3.0]])
    packed_w = torch.tensor([[0.5, 0.5, 0.5, 2.0, 2.0]])
    assert weighted_loss(packed_losses, packed_labels, packed_w, None) == pytest.approx(
        weighted_loss(per_token, labels, w, None).item())


def _loss_and_grads(model, batch, objective):
    """Total training loss, hidden states and LoRA grads of one batch through the trainer's objective."""
    model.zero_grad(set_to_none=True)
    labels = batch["labels"]
    loss, out = objective.loss_and_outputs(model, batch, None)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), out.last_hidden_state.detach(), labels, grads


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_row_gives_the_padded_batch_per_token_losses_total_loss_and_lora_grads(setup, tmp_path, attention):
    samples, model, collate = setup
    model.base_model.model.set_attn_implementation(attention)
    model.train()
    objective = ThinkerLM(router_aux_coef=0.5)  # aux on: its packed mean must match too
    head = model.base_model.model.lm_head
    loss_pad, hid_pad, lab_pad, g_pad = _loss_and_grads(model, collate[False](samples), objective)
    loss_pack, hid_pack, lab_pack, g_pack = _loss_and_grads(model, collate[True](samples), objective)

    with torch.no_grad():
        tok_pad, tok_pack = token_losses(hid_pad, head, lab_pad), token_losses(hid_pack, head, lab_pack)
    start = 0
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        torch.testing.assert_close(tok_pack[0, start:start + n - 1], tok_pad[b, :n - 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hid_pack[0, start:start + n], hid_pad[b, :n], rtol=1e-5, atol=1e-5)
        start += n
    assert (tok_pad > 0).sum() == (tok_pack > 0).sum() > 0
    torch.testing.assert_close(loss_pack, loss_pad, rtol=1e-5, atol=1e-6)
    assert g_pack.keys() == g_pad.keys() and any("lora_A" in n for n in g_pad)
    assert all(g_pad[n].abs().sum() > 0 for n in g_pad if "lora_" in n)
    for name in g_pad:  # LoRA, and the vision merger / audio projector the demo recipe trains in full
        torch.testing.assert_close(g_pack[name], g_pad[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_positions_keep_fractional_video_times(setup):
    samples, model, collate = setup
    batch = collate[True](samples)
    pos = packed_position_ids(model.base_model.model.model, batch, *(batch[k] for k in PACKED_KEYS))
    assert pos.shape == (4, 1, batch["input_ids"].shape[1])
    assert torch.equal(pos[0, 0], torch.cat([torch.arange(len(s["input_ids"])) for s in samples]).float())
    assert (pos[1:] != pos[1:].round()).any()  # 6.5: an integer position would be a different rotation


def test_training_with_packing_follows_the_padded_loss_curve_through_train_and_eval(demo_data, tmp_path):
    extra = ("train.max_steps=2", "train.batch_size=3", "train.save_steps=2", "train.logging_steps=1")
    # the same sample order on both sides: padded batches of several samples are length-grouped by default
    padded = train(small_recipe(demo_data, tmp_path / "padded", "data.group_by_length=false", *extra))
    packed = train(small_recipe(demo_data, tmp_path / "packed", "data.packing=true", *extra))
    assert packed.global_step == 2
    packed_curve, padded_curve = logged_losses(tmp_path / "packed"), logged_losses(tmp_path / "padded")
    assert [s for s, _ in packed_curve] == [s for s, _ in padded_curve]
    assert [v for _, v in packed_curve] == pytest.approx([v for _, v in padded_curve], rel=1e-5)
    assert packed.eval_loss == pytest.approx(padded.eval_loss, rel=1e-5)
    assert (tmp_path / "packed" / "adapter" / "adapter_config.json").exists()
