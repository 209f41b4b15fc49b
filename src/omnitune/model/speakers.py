"""Speakers: rows of the Talker's codec embedding, named in `talker_config.speaker_id` (chelsie/ethan/aiden =
2301/2302/2303 in the release). A new voice is a new row, learnt from its speech (the voice preset trains the
codec embedding: adapter.train has `codec_embedding`) and optionally started from an existing voice's row; its name
is saved with the run (RunDir.speakers) and put back into the config wherever the run is loaded (infer, eval,
export), so `generate(speaker=NAME)` finds it.

Which rows are free: the codebook-0 codes are rows [0, codebook size); the Talker never generates the top 1024
rows but codec_eos (generate() suppresses them), which hold the special codec tokens and the speakers. A new
speaker takes the next row after the highest speaker id that no special token uses.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from omnitune.errors import OmnituneError
from omnitune.model import parts


class SpeakerError(OmnituneError, ValueError):
    """An unknown speaker name, or no row left for a new one."""


def speaker_ids(model: nn.Module) -> dict[str, int]:
    """name -> codec-embedding row of every speaker the model knows (lower case, as generate() looks them up)."""
    return dict(_talker_config(model).speaker_id)


def _talker_config(model: nn.Module):
    return parts.unwrap(model).config.talker_config


def _special_ids(cfg) -> set[int]:
    return {v for k, v in vars(cfg).items() if k.startswith("codec_") and k.endswith("id") and isinstance(v, int)}


def add_speakers(model: nn.Module, names: list[str], init_from: str | None) -> dict[str, int]:
    """Give every new name in `names` a row of the codec embedding, started as `init_from`'s row (None: random,
    N(0, std of the existing speakers' rows)); the config's speaker table is updated. Returns the whole table."""
    cfg = _talker_config(model)
    table = dict(cfg.speaker_id)
    new = sorted({n.lower() for n in names} - set(table))
    if not new:
        return table
    if init_from is not None and init_from not in table:
        raise SpeakerError(f"talker.new_speaker_init: no voice {init_from!r} to start from (voices: "
                           f"{', '.join(sorted(table))})")
    embedding = parts.module(model, "codec_embedding")
    taken = _special_ids(cfg) | set(table.values())
    row = max(table.values(), default=cfg.codec_eos_token_id)
    with torch.no_grad():
        for name in new:
            row += 1
            while row in taken:
                row += 1
            if row >= embedding.num_embeddings:
                raise SpeakerError(f"no free codec-embedding row left for speaker {name!r}")
            if init_from is not None:
                embedding.weight[row] = embedding.weight[table[init_from]]
            else:
                std = embedding.weight[list(table.values())].std() if table else 0.02
                embedding.weight[row].normal_(0.0, float(std))
            table[name] = row
            taken.add(row)
    cfg.speaker_id = table
    return table


def save_speakers(table: dict[str, int], path: str | Path) -> None:
    Path(path).write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


def load_speakers(model: nn.Module, path: str | Path) -> dict[str, int]:
    """Put a run's speaker table (RunDir.speakers, if it exists) into the model's config; returns the table."""
    path = Path(path)
    cfg = _talker_config(model)
    if path.is_file():
        cfg.speaker_id = {**cfg.speaker_id, **{k: int(v) for k, v in json.loads(path.read_text()).items()}}
    return dict(cfg.speaker_id)
