"""Word-level LSTM text generation on one-line jokes: `python -m bilstm_fast.apps.textgen`.

The classic small example: Embedding(V, 128) -> 3-layer unidirectional LSTM(128, dropout 0.2)
-> Linear(128, V), trained on windows of 4 words to predict the same window shifted by one
word. It exercises what the MNIST classifier does not: bidirectional=False, an embedding
input, and stateful generation that feeds one word per call (T=1) while carrying (h, c).

    python -m bilstm_fast.apps.textgen --epochs 60 --save jokes.pt
    python -m bilstm_fast.apps.textgen --load jokes.pt --prompt "Why do" --next-words 20 --seed 1

`--impl torch` builds the same model on nn.LSTM; checkpoints load into either.
The default corpus is the English jokes bundled in `pyjokes` (offline); `--data FILE` reads a
text file (one document a line) or a CSV (`--column Joke` is the classic clean-jokes layout).
"""
import argparse
import csv
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bilstm_fast.kernels import BACKENDS
from bilstm_fast.module import FastBiLSTM

CHECKPOINT_FORMAT = "bilstm_fast.textgen/1"  # a format tag saved in checkpoints, kept across the move to apps/


# --- corpus and vocabulary ---------------------------------------------------------------


def load_documents(path=None, column=None):
    """The corpus as a list of documents: pyjokes by default, else a text or CSV file."""
    if path is None:
        try:
            import pyjokes
        except ImportError as err:
            raise RuntimeError(
                "the default corpus is the jokes bundled in pyjokes: `pip install pyjokes`, "
                "or name a text/CSV file with --data"
            ) from err
        return list(pyjokes.get_jokes(language="en", category="all"))
    path = Path(path)
    if column is None and path.suffix.lower() != ".csv":
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    column = column or "Joke"
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if column not in (reader.fieldnames or []):
            raise ValueError(f"{path}: no column {column!r}; its columns are {reader.fieldnames}")
        return [row[column] for row in reader if row[column]]


def tokenize(documents):
    """Words as the original example has them: documents joined, split on whitespace.

    Whitespace rather than ' ' alone so that newlines inside a CSV field, or doubled
    spaces, do not become words of their own; case and punctuation are kept.
    """
    return " ".join(documents).split()


class UnknownWordError(ValueError):
    pass


class Vocabulary:
    """Words ordered by frequency (most frequent first; ties in order of first appearance)."""

    def __init__(self, words):
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def from_tokens(cls, tokens):
        counts = Counter(tokens)  # insertion-ordered, and sorted() is stable
        return cls(sorted(counts, key=counts.get, reverse=True))

    def __len__(self):
        return len(self.words)

    def encode(self, words):
        unknown = [w for w in words if w not in self.index]
        if unknown:
            names = ", ".join(repr(w) for w in dict.fromkeys(unknown))
            examples = ", ".join(repr(w) for w in self.words[:8])
            raise UnknownWordError(
                f"unknown word(s) in the prompt: {names}. The model knows only the {len(self)} "
                f"words of its training corpus, split on spaces and case-sensitive "
                f"(most frequent: {examples})"
            )
        return [self.index[w] for w in words]

    def decode(self, ids):
        return [self.words[i] for i in ids]


def make_windows(ids, seq_len):
    """[N] word ids -> inputs, targets [N - seq_len, seq_len]; targets are inputs shifted by one."""
    if len(ids) <= seq_len:
        raise ValueError(f"the corpus has {len(ids)} words: fewer than a window of {seq_len} + 1")
    windows = torch.as_tensor(ids, dtype=torch.long).unfold(0, seq_len + 1, 1)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


# --- model ---------------------------------------------------------------------------------


class WordLSTM(nn.Module):
    """Embedding -> unidirectional 3-layer LSTM -> Linear, batch-first, state in and out."""

    def __init__(self, vocab_size, impl="fast", backend="auto", embedding_dim=128, hidden_size=128,
                 num_layers=3, dropout=0.2):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        lstm_args = dict(num_layers=num_layers, dropout=dropout, batch_first=True, bidirectional=False)
        if impl == "fast":
            self.lstm = FastBiLSTM(embedding_dim, hidden_size, backend=backend, **lstm_args)
        elif impl == "torch":
            self.lstm = nn.LSTM(embedding_dim, hidden_size, **lstm_args)
        else:
            raise ValueError(f"impl must be 'fast' or 'torch', got {impl!r}")
        self.fc = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens, state=None):
        """tokens [B, T] -> logits [B, T, V], (h, c) each [layers, B, H] to pass back in."""
        out, state = self.lstm(self.embedding(tokens), state)
        return self.fc(out), state


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# --- training ------------------------------------------------------------------------------


class ProgressBar:
    """A one-line text bar on stderr, redrawn in place and throttled so logs stay small."""

    def __init__(self, total, label, stream=None, width=30, interval=0.2):
        self.total, self.label, self.width, self.interval = total, label, width, interval
        self.stream = sys.stderr if stream is None else stream
        self.last_draw = float("-inf")

    def update(self, done, loss):
        now = time.perf_counter()
        if done < self.total and now - self.last_draw < self.interval:
            return
        self.last_draw = now
        filled = self.width * done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} loss {loss:.4f}")
        self.stream.flush()

    def close(self):
        self.stream.write("\n")
        self.stream.flush()


def train(model, inputs, targets, epochs=1, batch_size=256, lr=1e-3, seed=0, max_steps=None,
          progress=True, log=None):
    """Adam on next-word cross-entropy, windows shuffled each epoch, each from a zero state.

    `seed` fixes the shuffling and the dropout masks, so two models with the same weights
    train identically. Returns (per-step losses, per-epoch mean losses).
    """
    device = next(model.parameters()).device
    torch.manual_seed(seed)  # dropout draws from the global generator
    order_rng = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    n = inputs.shape[0]
    steps_per_epoch = -(-n // batch_size)
    step_losses, epoch_losses = [], []
    model.train()
    for epoch in range(epochs):
        if max_steps is not None and len(step_losses) >= max_steps:
            break
        start = time.perf_counter()
        bar = ProgressBar(steps_per_epoch, f"epoch {epoch + 1}/{epochs}") if progress else None
        order = torch.randperm(n, generator=order_rng)
        total, seen = 0.0, 0
        for step, first in enumerate(range(0, n, batch_size)):
            if max_steps is not None and len(step_losses) >= max_steps:
                break
            batch = order[first : first + batch_size]
            x, y = inputs[batch].to(device), targets[batch].to(device)
            logits, _ = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            step_losses.append(value)
            total, seen = total + value * len(batch), seen + len(batch)
            if bar:
                bar.update(step + 1, total / seen)
        if bar:
            bar.close()
        epoch_losses.append(total / seen)
        if log:
            log(f"epoch {epoch + 1}/{epochs} loss {total / seen:.7g} ({time.perf_counter() - start:.1f} s)")
    return step_losses, epoch_losses


# --- generation ----------------------------------------------------------------------------


@torch.no_grad()
def generate(model, vocab, prompt, next_words, temperature=1.0, seed=0):
    """Prompt words followed by `next_words` sampled ones.

    The prompt runs once; after that each call feeds only the last sampled word (T=1) and
    the (h, c) state the previous call returned. temperature 0 takes the most likely word.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    words = prompt.split()
    if not words:
        raise ValueError("the prompt is empty")
    ids = vocab.encode(words)
    model.eval()
    device = next(model.parameters()).device
    rng = torch.Generator().manual_seed(seed)
    logits, state = model(torch.tensor([ids], device=device))
    sampled = []
    for _ in range(next_words):
        last = logits[0, -1].float().cpu()  # [V]; sampled on the CPU so one seed fits any device
        if temperature == 0:
            word = int(last.argmax())
        else:
            word = int(torch.multinomial(torch.softmax(last / temperature, dim=0), 1, generator=rng))
        sampled.append(word)
        logits, state = model(torch.tensor([[word]], device=device), state)
    return words + vocab.decode(sampled)


# --- checkpoints ---------------------------------------------------------------------------


def save_checkpoint(path, model, vocab):
    """Weights, vocabulary and sizes: everything generation needs, without the corpus."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lstm = model.lstm
    config = dict(embedding_dim=model.embedding.embedding_dim, hidden_size=lstm.hidden_size,
                  num_layers=lstm.num_layers, dropout=float(lstm.dropout))
    torch.save({"format": CHECKPOINT_FORMAT, "config": config, "vocab": vocab.words,
                "state_dict": model.state_dict()}, path)


def load_checkpoint(path, impl="fast", backend="auto", device="cpu"):
    """(model, vocab) from save_checkpoint's file, built on FastBiLSTM or nn.LSTM (`impl`)."""
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    vocab = Vocabulary(checkpoint["vocab"])
    model = WordLSTM(len(vocab), impl=impl, backend=backend, **checkpoint["config"]).to(device)
    model.load_state_dict(checkpoint["state_dict"])
    return model, vocab


# --- command line --------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bilstm_fast.apps.textgen", description=__doc__.split("\n")[0])
    p.add_argument("--impl", choices=("fast", "torch"), default="fast",
                   help="FastBiLSTM (bilstm_fast) or nn.LSTM")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="FastBiLSTM backend")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", help="text file (one document a line) or CSV; default: pyjokes")
    p.add_argument("--column", help="CSV column holding the text (default Joke)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=4, help="words per training window")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="initial weights, shuffling, dropout, sampling")
    p.add_argument("--save", help="write a checkpoint here after training")
    p.add_argument("--load", help="skip training: generate from this checkpoint")
    p.add_argument("--prompt", help="generate from these words after training or loading")
    p.add_argument("--next-words", type=int, default=30)
    p.add_argument("--temperature", type=float, default=1.0, help="0 takes the most likely word")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.load:
        model, vocab = load_checkpoint(args.load, impl=args.impl, backend=args.backend, device=device)
        print(f"loaded {args.load}: vocabulary {len(vocab)}, {count_parameters(model):,} parameters")
    else:
        documents = load_documents(args.data, args.column)
        tokens = tokenize(documents)
        vocab = Vocabulary.from_tokens(tokens)
        inputs, targets = make_windows(vocab.encode(tokens), args.seq_len)
        print(f"corpus: {args.data or 'pyjokes'}, {len(documents)} documents, {len(tokens)} words, "
              f"vocabulary {len(vocab)}, {len(inputs)} windows of {args.seq_len}")
        torch.manual_seed(args.seed)  # the same seed builds the same weights for either impl
        model = WordLSTM(len(vocab), impl=args.impl, backend=args.backend).to(device)
        print(f"model: {args.impl}, {count_parameters(model):,} parameters, device {device}")
        start = time.perf_counter()
        steps, epochs = train(model, inputs, targets, epochs=args.epochs, batch_size=args.batch_size,
                              lr=args.lr, seed=args.seed, max_steps=args.max_steps,
                              progress=not args.no_progress, log=print)
        if steps:
            print(f"trained {len(epochs)} epochs ({len(steps)} steps) in {time.perf_counter() - start:.1f} s, "
                  f"last epoch loss {epochs[-1]:.7g}")
        if args.save:
            save_checkpoint(args.save, model, vocab)
            print(f"saved {args.save}")
    if args.prompt is not None:
        try:
            words = generate(model, vocab, args.prompt, args.next_words, args.temperature, args.seed)
        except ValueError as err:  # unknown words, empty prompt, bad temperature
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(" ".join(words))
    return 0


if __name__ == "__main__":
    sys.exit(main())
