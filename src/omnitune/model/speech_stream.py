"""Streamed speech: the Talker's codec frames are handed out as they are generated, and Code2Wav decodes them in
chunks whose concatenation is the whole-utterance waveform.

Why our own decoder: transformers' `Code2Wav.chunked_decode(codes, 300, 25)` is not the whole decode. Its causal
transposed convolutions trim kernel - stride samples on both sides, so decoding n frames yields n * 1920 - 555
samples at the release's upsampling: every output sample needs one frame of look-ahead. chunked_decode appends each
chunk as if it were complete, so every chunk boundary drops 555 samples (23 ms) and shifts what follows; and its 25
frames of left context are far below what the model sees: 8 sliding-window attention layers (window 72) reach 568
frames back, the convolutions about 11 more.

`StreamingCode2Wav` keeps the count of samples already handed out and cuts each chunk's output exactly there, so
nothing is dropped or repeated. Code2Wav is causal (left-padded convolutions; sliding-window attention with RoPE,
which only sees relative positions), so a chunk reproduces the whole decode once it sees the receptive field. The
two stages need very different context: the transformer runs at 12.5 Hz and is cheap, so it gets its whole reach
(568 frames at the release); the convolutions run at up to 24 kHz and are costly, and need only their own ~11
frames. A chunk therefore costs little more than decoding its own frames.

`stream_speech(model, on_audio)` installs this on a full model for one `generate()` call: a hook hands each frame
to the decoder as soon as the code predictor has completed it, and generate()'s own final chunked_decode is
answered with the pieces already decoded (so it neither drops samples nor decodes twice).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from omnitune.model import parts


def context_frames(code2wav: nn.Module) -> tuple[int, int]:
    """(transformer, convolution) left context in frames that makes a chunk's output exact.

    The transformer's: each sliding-window layer sees window - 1 frames back (a layer with full attention sees
    everything: then the transformer gets every earlier frame, returned as a huge number). The convolutions': the
    left padding of every causal convolution (kernel - 1, dilation included) at the sample rate it runs at, in
    frames; the transposed convolutions reach no further back than their own input frame."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (Qwen3OmniMoeCausalConvNet,
                                                                             Qwen3OmniMoeCausalTransConvNet)

    cfg = code2wav.config
    if any(t != "sliding_attention" for t in cfg.layer_types):
        attention = 1 << 30
    else:
        attention = cfg.num_hidden_layers * (cfg.sliding_window - 1)
    reach, rate = 0.0, 1  # rate: output samples per frame at this point of the network
    for m in [*code2wav.upsample.modules(), *code2wav.decoder.modules()]:  # registration order = forward order
        if isinstance(m, Qwen3OmniMoeCausalTransConvNet):
            rate *= m.conv.stride[0]
        elif isinstance(m, Qwen3OmniMoeCausalConvNet):
            reach += (m.kernel_size - 1) / rate
    return attention, math.ceil(reach)


class StreamingCode2Wav:
    """Decode codec frames in chunks as they arrive; the pieces concatenate to `code2wav(all codes)`.

        dec = StreamingCode2Wav(model.code2wav, chunk=12)
        for frame in frames:            # [num_quantizers] codes each
            for piece in dec.push(frame):
                play(piece)             # float32 [n]
        play(dec.flush())

    `left_context` (frames of transformer context, default: its whole reach, exact) trades exactness for speed;
    the convolutions always get theirs."""

    def __init__(self, code2wav: nn.Module, chunk: int = 12, left_context: int | None = None):
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 frame, not {chunk}")
        self.code2wav, self.chunk = code2wav, chunk
        attention, self.conv_context = context_frames(code2wav)
        self.attention_context = attention if left_context is None else max(0, left_context)
        self.up = int(code2wav.total_upsample)
        self.frames: list[torch.Tensor] = []  # [num_quantizers] each
        self.decoded = 0  # frames whose samples have been handed out (all but the look-ahead tail)
        self.emitted = 0  # samples handed out
        self.pieces: list[np.ndarray] = []

    def push(self, frame: torch.Tensor) -> list[np.ndarray]:
        """Add one frame ([num_quantizers] codes, or [1, num_quantizers]); returns the pieces it completes."""
        self.frames.append(frame.reshape(-1))
        if len(self.frames) - self.decoded >= self.chunk:
            return [self._decode()]
        return []

    def flush(self) -> np.ndarray | None:
        """Decode what is left (the end of the utterance); None when nothing is."""
        return self._decode() if len(self.frames) > self.decoded else None

    @property
    def waveform(self) -> np.ndarray:
        """Everything handed out so far, as one float32 array."""
        return np.concatenate(self.pieces) if self.pieces else np.zeros(0, np.float32)

    @torch.no_grad()
    def _decode(self) -> np.ndarray:
        c2w, end = self.code2wav, len(self.frames)
        # The first sample not yet handed out belongs to this frame; the convolutions need conv_context before it,
        # the transformer attention_context before that.
        first = self.emitted // self.up
        conv_start = max(0, first - self.conv_context)
        start = max(0, conv_start - self.attention_context)
        codes = torch.stack(self.frames[start:end], -1).unsqueeze(0).to(c2w.code_embedding.weight.device)
        hidden = c2w.code_embedding(codes + c2w.code_offset).mean(1)
        hidden = c2w.pre_transformer(inputs_embeds=hidden).last_hidden_state[:, conv_start - start:]
        wav = hidden.permute(0, 2, 1)
        for blocks in c2w.upsample:
            for block in blocks:
                wav = block(wav)
        for block in c2w.decoder:
            wav = block(wav)
        wav = wav.clamp(min=-1, max=1)
        piece = wav[0, 0, self.emitted - conv_start * self.up:].float().cpu().numpy()
        self.emitted += piece.size
        self.decoded = end
        self.pieces.append(piece)
        return piece


@contextmanager
def stream_speech(model: nn.Module, on_audio: Callable[[np.ndarray], None] | None = None,
                  chunk: int = 12) -> Iterator[StreamingCode2Wav]:
    """For one `model.generate(..., return_audio=True)` call (batch of one): decode the Talker's frames as they
    are generated, hand each piece to `on_audio`, and make generate() return their concatenation.

    The frame hook: the Talker's code predictor completes frame k (codebook 0 sampled at step k, the residual
    codebooks drawn while step k + 1's input is prepared) and passes it to step k + 1's forward as
    `residual_codes`; that is the earliest moment all of its codes exist."""
    code2wav, talker = parts.module(model, "code2wav"), parts.module(model, "talker")
    decoder = StreamingCode2Wav(code2wav, chunk=chunk)

    def emit(pieces: list[np.ndarray | None]) -> None:
        for piece in pieces:
            if piece is not None and piece.size and on_audio is not None:
                on_audio(piece)

    def on_step(module, args, kwargs):
        codes = kwargs.get("residual_codes")
        if codes is not None:
            if codes.shape[0] != 1:
                raise RuntimeError("streamed speech decodes one conversation at a time (batch of one)")
            emit(decoder.push(codes[0]))

    def whole(codes: torch.Tensor, **_) -> torch.Tensor:
        # generate() hands over every frame it made: the ones the hook saw (checked), whose tail is decoded now.
        seen = torch.stack(decoder.frames, -1) if decoder.frames else codes.new_zeros(codes.shape[1:])
        if codes.shape[-1] != len(decoder.frames) or not torch.equal(codes[0].to(seen.device), seen):
            raise RuntimeError("the Talker's frames differ from the ones streamed: the frame hook is out of step "
                               "with this transformers version's generate()")
        emit([decoder.flush()])
        return torch.from_numpy(decoder.waveform).reshape(1, 1, -1)

    hook = talker.register_forward_pre_hook(on_step, with_kwargs=True)
    code2wav.chunked_decode = whole  # instance attribute: shadows the class's method for this call only
    try:
        yield decoder
    finally:
        hook.remove()
        del code2wav.chunked_decode
