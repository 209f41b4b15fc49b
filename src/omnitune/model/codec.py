"""Speech -> codec codes: the encoder that turns target speech into the Talker's training targets.

No official audio -> codes encoder was released with Qwen3-Omni. What the public uses for Omni Talker targets is
Mimi's first 16 codebooks (Kyutai's codec, 12.5 Hz at 24 kHz, 1920 samples a frame, 2048 codes a book), and Qwen's
own Qwen3-TTS 12 Hz tokenizer encoder IS a `MimiModel` keeping 16 of its 32 codebooks. Both therefore run on
transformers' `MimiModel`, built encoder-only (`decoder_config=None`). Which one matches a checkpoint's Code2Wav is
an empirical question: `omnitune codec-check` answers it (the right one gives a much lower teacher-forced CE).

Pluggable (`talker.codec`): `mimi`, `qwen3-tts-12hz`, `tiny` (a random Mimi shaped like the model's codec, for
tests and benchmarks) or `package.module:Class`, a class built as `Class(talker_config, recipe_talker_section)`
with the `SpeechCodec` interface. `codec_fingerprint` names what the codes depend on: the data cache is keyed by it.

transformers 5.23's Mimi encoder attends over a 250-frame sliding window (4.57 took the checkpoint's): it is
exposed as `talker.codec_sliding_window` so codes can be made the way the Talker's training codes were.
"""
from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from omnitune.errors import OmnituneError

SAMPLE_RATE = 24000  # what the Talker's codec and Code2Wav run at
FRAME_SAMPLES = 1920  # 12.5 frames a second
DEFAULT_PATHS = {"mimi": "kyutai/mimi", "qwen3-tts-12hz": "Qwen/Qwen3-TTS-Tokenizer-12Hz"}


class CodecError(OmnituneError, ValueError):
    """A codec that cannot be loaded or does not fit the model's Talker."""


class SpeechCodec(Protocol):
    """Encodes 24 kHz mono speech into [frames, codebooks] int64 codes."""

    sample_rate: int
    num_codebooks: int
    codebook_size: int

    def encode(self, wav: np.ndarray) -> torch.Tensor: ...


class MimiCodec:
    """transformers' `MimiModel`, encoder-only, its first `num_codebooks` codebooks."""

    sample_rate = SAMPLE_RATE

    def __init__(self, model, num_codebooks: int):
        self.model = model.eval()
        self.num_codebooks = num_codebooks
        self.codebook_size = model.config.codebook_size
        if model.config.num_quantizers < num_codebooks:
            raise CodecError(f"the codec has {model.config.num_quantizers} codebooks; the Talker needs "
                             f"{num_codebooks}")

    @torch.no_grad()
    def encode(self, wav: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.ascontiguousarray(wav, dtype=np.float32))[None, None]
        param = next(self.model.parameters())
        codes = self.model.encode(x.to(param.device, param.dtype), num_quantizers=self.num_codebooks).audio_codes
        return codes[0].T.long().cpu()  # [codebooks, frames] -> [frames, codebooks]


def tiny_mimi(num_codebooks: int, codebook_size: int, seed: int = 0, sliding_window: int = 250):
    """A random encoder-only Mimi with the real frame rate (24 kHz, 1920 samples a frame) and the given codebooks;
    its codebooks are filled at random (a fresh Mimi's are all zero, which maps every frame to code 0)."""
    from transformers import MimiConfig, MimiModel

    cfg = MimiConfig(hidden_size=32, num_filters=4, codebook_size=codebook_size, codebook_dim=16,
                     vector_quantization_hidden_dimension=16, num_quantizers=max(num_codebooks, 2),
                     num_semantic_quantizers=1, upsample_groups=32, num_hidden_layers=1, intermediate_size=64,
                     num_attention_heads=4, num_key_value_heads=4, sliding_window=sliding_window,
                     decoder_config=None)
    with torch.random.fork_rng(devices=[]):  # the same codec in every process: codes must not depend on who made them
        torch.manual_seed(seed)
        model = MimiModel(cfg)
        with torch.no_grad():
            for name, buf in model.quantizer.named_buffers():
                if name.endswith("embed_sum"):
                    buf.normal_()
    return model.eval()


def load_codec(talker_config, section) -> SpeechCodec:
    """The codec `section.codec` names (recipe `talker`), checked against the Talker's code groups and books."""
    books = talker_config.num_code_groups
    size = talker_config.code_predictor_config.vocab_size
    name = section.codec
    if name == "tiny":
        codec: SpeechCodec = MimiCodec(tiny_mimi(books, size, sliding_window=section.codec_sliding_window or 250),
                                       books)
    elif name in DEFAULT_PATHS:
        codec = MimiCodec(_load_mimi(section.codec_path or DEFAULT_PATHS[name], name, section.codec_sliding_window),
                          books)
    else:
        codec = _custom(name)(talker_config, section)
    if codec.num_codebooks != books or codec.codebook_size != size:
        raise CodecError(f"talker.codec={name} gives {codec.num_codebooks} codebooks of {codec.codebook_size} codes; "
                         f"this Talker reads {books} of {size}")
    return codec


def codec_fingerprint(talker_config, section) -> str:
    """What codes depend on, without loading the codec: its name, its weights' identity, the window and the
    Talker's code shape. The data cache is keyed by it, so changing the codec prepares the data again."""
    path = section.codec_path or DEFAULT_PATHS.get(section.codec, "")
    return (f"{section.codec}|{_identity(path) if path else ''}|window={section.codec_sliding_window}|"
            f"{talker_config.num_code_groups}x{talker_config.code_predictor_config.vocab_size}")


def _load_mimi(path: str, name: str, window: int | None):
    from transformers import MimiConfig, MimiModel

    over = {"decoder_config": None}
    if window is not None:
        over["sliding_window"] = window
    try:
        if name == "qwen3-tts-12hz":
            return _qwen3_tts_encoder(path, over)
        return MimiModel.from_pretrained(path, **over)
    except OSError as e:
        raise CodecError(f"talker.codec={name}: cannot load {path!r} ({str(e).splitlines()[0][:200]}); set "
                         "talker.codec_path to a local copy of the codec (no hub is reachable from here)") from None
    except (ValueError, TypeError) as e:
        raise CodecError(f"talker.codec={name}: {path!r} is not a {MimiConfig.model_type} codec "
                         f"({str(e).splitlines()[0][:200]})") from None


def _qwen3_tts_encoder(path: str, over: dict):
    """Qwen3-TTS's 12 Hz tokenizer: a checkpoint whose `encoder_config` is a Mimi config and whose encoder weights
    sit under `encoder.` (its encoder class subclasses `MimiModel`). Not checked against the released files here
    (no hub): a mismatch is reported with the first keys that did not load."""
    import json

    from safetensors.torch import load_file
    from transformers import MimiConfig, MimiModel

    root = Path(path)
    if not (root / "config.json").is_file():
        raise OSError(f"{path} has no config.json")
    raw = json.loads((root / "config.json").read_text())
    model = MimiModel(MimiConfig(**{**raw.get("encoder_config", raw), **over}))
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(root.glob("*.safetensors")):
        state.update({k.removeprefix("encoder."): v for k, v in load_file(str(shard)).items()
                      if k.startswith("encoder.")})
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("initialized", "cluster_usage", "embed_sum"))]
    if missing or not state:
        raise ValueError(f"{len(missing)} encoder weights missing, e.g. {missing[:3]}")
    return model


def _identity(path: str) -> str:
    """What the codes of a codec at `path` depend on: its weight files' sizes and times, or the hub id."""
    local = Path(path)
    if not local.is_dir():
        return path
    h = hashlib.sha256()
    for f in sorted(local.glob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}|".encode())
    return f"{local.resolve()}|{h.hexdigest()[:16]}"


def _custom(spec: str):
    module, _, cls = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise CodecError(f"talker.codec={spec!r}: cannot import {cls} from {module} ({e})") from None
