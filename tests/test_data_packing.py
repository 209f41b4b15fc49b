"""A packed row of samples gives each sample exactly the logits it gets alone."""
import torch
from model_helpers import tiny_thinker

from omnitune.data.packing import pack_samples


def samples(lengths):
    return [{"input_ids": torch.randint(10, 240, (n,))} for n in lengths]


def test_packed_logits_equal_each_sample_run_alone():
    model = tiny_thinker("omnitune")
    model.set_attn_implementation("sdpa")
    batch = samples([7, 12, 5])
    packed = pack_samples(batch)
    assert packed["position_ids"].shape == (4, 1, 24)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        for piece, s in zip(torch.split(logits[0], packed["seq_lengths"].tolist()), batch):
            ids = s["input_ids"][None]
            alone = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            assert torch.allclose(piece, alone, atol=1e-9)


def test_labels_never_cross_sample_boundaries():
    batch = samples([4, 3, 2])
    batch[1]["labels"] = torch.tensor([-100, 5, 6])
    packed = pack_samples(batch)
    labels = packed["labels"][0]
    assert labels[4] == -100 and labels[7] == -100  # first token of samples 2 and 3
    assert torch.equal(labels[:4], batch[0]["input_ids"])
    assert packed["position_ids"][0, 0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]


def test_media_samples_keep_their_own_mrope_positions():
    mrope = torch.tensor([[0, 1, 1, 1, 2], [0, 1, 1, 2, 3], [0, 1, 2, 1, 4]])
    packed = pack_samples([{"input_ids": torch.arange(3) + 10}, {"input_ids": torch.arange(5) + 10, "mrope_position_ids": mrope}])
    pos = packed["position_ids"][:, 0]
    assert torch.equal(pos[1:, 3:], mrope)
    assert torch.equal(pos[1:, :3], torch.arange(3).expand(3, 3))
    assert pos[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]


def test_pack_samples_keeps_fractional_mrope_positions():
    # 4 fps video, 2 frames per grid: temporal positions 0, 6.5, 13, ... must not be truncated.
    mrope = torch.tensor([[0.0, 6.5, 13.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    packed = pack_samples([{"input_ids": torch.arange(2)}, {"input_ids": torch.arange(3), "mrope_position_ids": mrope}])
    assert packed["position_ids"][1, 0, 2:].tolist() == [0.0, 6.5, 13.0]
    assert packed["position_ids"][0, 0].tolist() == [0.0, 1.0, 0.0, 1.0, 2.0]
