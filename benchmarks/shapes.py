"""Benchmark shapes, their inputs and their matmul FLOPs (the floor arithmetic)."""
from dataclasses import dataclass, replace

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

MODES = ("inference", "training")


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    T: int
    I: int
    H: int
    layers: int = 1
    bidirectional: bool = True
    varlen: bool = False  # lengths uniform in [T/4, T]; timed packed and padded
    note: str = ""  # why this run's shape differs from the issue's, if it does

    @property
    def D(self):
        return 2 if self.bidirectional else 1

    def label(self):
        dirs = "" if self.bidirectional else " uni"
        layers = f" L{self.layers}" if self.layers > 1 else ""
        return f"{self.name} (B{self.B} T{self.T} I{self.I} H{self.H}{layers}{dirs})"


SHAPES = {
    "mnist": Shape("mnist", B=64, T=28, I=28, H=256, layers=2),
    "tagging": Shape("tagging", B=32, T=128, I=300, H=512),
    "tagging-uni": Shape("tagging-uni", B=32, T=128, I=300, H=512, bidirectional=False),
    "latency-b1": Shape("latency-b1", B=1, T=1024, I=768, H=768),
    "latency-b16": Shape("latency-b16", B=16, T=1024, I=768, H=768),
    "large-batch": Shape("large-batch", B=256, T=100, I=512, H=512),
    "varlen": Shape("varlen", B=32, T=128, I=300, H=512, varlen=True),
    # a CRF tagger's inner loop: the per-call overhead around a tiny recurrence, not the math
    "tiny": Shape("tiny", B=1, T=11, I=4, H=4),
    # the bf16 and deployment issues' shapes: an NER tagger and a batch-1 stream (not in the default run)
    "ner": Shape("ner", B=24, T=96, I=200, H=384),
    "stream-b1": Shape("stream-b1", B=1, T=200, I=256, H=320),
    # the unidirectional-stack issue's language models: pytorch/examples' word LM (medium) and the
    # text-generation example's size, and a large batch (not in the default run)
    "word-lm": Shape("word-lm", B=20, T=35, I=650, H=650, layers=2, bidirectional=False),
    "small-text": Shape("small-text", B=32, T=50, I=128, H=128, layers=3, bidirectional=False),
    "large-batch-uni": Shape("large-batch-uni", B=64, T=100, I=512, H=512, layers=2, bidirectional=False),
}
EXTRA_SHAPES = ("ner", "stream-b1", "word-lm", "small-text", "large-batch-uni")
DEFAULT_SHAPES = {device: [name for name in SHAPES if name not in EXTRA_SHAPES] for device in ("cpu", "cuda")}
# A 2-core CPU cannot time every implementation on the long shapes within the run's budget
# (about 10 minutes): the CPU run shortens T there. Per-step time and tokens/s stay comparable.
CPU_TRIMS = {"latency-b1": 256, "latency-b16": 256, "large-batch": 50}


def quick_shape(shape):
    """A tiny version with the same structure (layers, directions, varlen) for smoke runs."""
    return replace(shape, B=min(shape.B, 3), T=min(shape.T, 6), I=min(shape.I, 5), H=min(shape.H, 8),
                   note="--quick")


def select_shapes(names, device, quick):
    shapes = []
    for name in names:
        shape = SHAPES[name]
        if quick:
            shape = quick_shape(shape)
        elif device.type == "cpu" and name in CPU_TRIMS:
            shape = replace(shape, T=CPU_TRIMS[name], note=f"T trimmed from {shape.T} on CPU")
        shapes.append(shape)
    return shapes


def draw_lengths(shape, generator):
    low = max(1, shape.T // 4)
    lengths = torch.randint(low, shape.T + 1, (shape.B,), generator=generator)
    lengths[0] = shape.T  # the padded batch is T long, as a real batch padded to its longest
    return lengths


def make_inputs(shape, dtype, device, seed, packed):
    """(input, output gradient) for one call: normal draws, never zeros; packed or padded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.T, shape.B, shape.I, generator=g)
    if packed:
        lengths = draw_lengths(shape, torch.Generator().manual_seed(1234))  # the same for every draw
        x = pack_padded_sequence(x, lengths, enforce_sorted=False)
        x = PackedSequence(x.data.to(device=device, dtype=dtype), x.batch_sizes,
                           x.sorted_indices.to(device), x.unsorted_indices.to(device))
        dout = torch.randn(x.data.shape[0], shape.D * shape.H, generator=g)
    else:
        x = x.to(device=device, dtype=dtype)
        dout = torch.randn(shape.T, shape.B, shape.D * shape.H, generator=g)
    return x, dout.to(device=device, dtype=dtype)


def lstm_flops(shape, mode, tokens=None):
    """Matmul FLOPs of one call (2 per multiply-add). Per layer and direction and token, the
    forward does x W_ih^T and h W_hh^T: 2*4H*(I_l + H); the backward does dh = dgates W_hh,
    dW_hh, dW_ih, and dx for every layer but the first (the input needs no gradient).
    The gate arithmetic (O(H) per token) is left out. `tokens` counts valid tokens (varlen)."""
    tokens = shape.B * shape.T if tokens is None else tokens
    G, D = 4 * shape.H, shape.D
    total = 0
    for layer in range(shape.layers):
        I = shape.I if layer == 0 else D * shape.H
        total += 2 * G * (I + shape.H)
        if mode == "training":
            total += 2 * G * (2 * shape.H + I + (I if layer > 0 else 0))
    return total * D * tokens
