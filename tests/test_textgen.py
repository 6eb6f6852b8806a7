"""The jokes text-generation example: fast vs torch training, generation, state, checkpoints, CLI.

Corpora here are small and made in the test, so it runs in seconds on 2 cores; the model has
the example's real sizes (Embedding 128, 3 layers of 128, dropout 0.2).
"""
import re

import pytest
import torch
from torch import nn

from bilstm_fast import FastBiLSTM
from bilstm_fast.apps.textgen import (
    UnknownWordError,
    Vocabulary,
    WordLSTM,
    generate,
    load_checkpoint,
    load_documents,
    main,
    make_windows,
    save_checkpoint,
    tokenize,
    train,
)

WORDS = "why did the chicken cross road to get other side programmer quit his job because he "
WORDS += "didn't get arrays a SQL query walks into bar and asks two tables can I join you"
WORDS = WORDS.split()


def sentences(n, seed=0):
    """n made-up one-line 'jokes' of 5-11 words from WORDS, the same for a given seed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 12, (), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (length,), generator=g)) + ".")
    return out


@pytest.fixture
def corpus():
    tokens = tokenize(sentences(40))
    vocab = Vocabulary.from_tokens(tokens)
    inputs, targets = make_windows(vocab.encode(tokens), 4)
    return vocab, inputs, targets


def twin_models(vocab_size, seed=0, dtype=torch.float32):
    """An nn.LSTM-built model and a FastBiLSTM-built one holding the same weights."""
    torch.manual_seed(seed)
    ref = WordLSTM(vocab_size, impl="torch").to(dtype)
    fast = WordLSTM(vocab_size, impl="fast", backend="vectorized").to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


# --- corpus and vocabulary ------------------------------------------------------------------


def test_vocabulary_by_frequency_and_windows_shift_by_one():
    tokens = tokenize(["b a c a", "b a\nd  e"])  # newlines and doubled spaces are not words
    assert tokens == ["b", "a", "c", "a", "b", "a", "d", "e"]
    vocab = Vocabulary.from_tokens(tokens)
    assert vocab.words == ["a", "b", "c", "d", "e"]  # ties keep first-appearance order
    inputs, targets = make_windows(vocab.encode(tokens), 4)
    assert inputs.shape == targets.shape == (len(tokens) - 4, 4)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert vocab.decode(inputs[0].tolist()) == ["b", "a", "c", "a"]
    assert vocab.decode(targets[-1].tolist()) == ["b", "a", "d", "e"]


def test_csv_clean_jokes_layout_and_text_file(tmp_path):
    path = tmp_path / "jokes.csv"
    path.write_text('ID,Joke\n1,"What did the ocean say?\nNothing, it waved."\n2,Knock knock.\n')
    assert load_documents(path, "Joke") == ["What did the ocean say?\nNothing, it waved.", "Knock knock."]
    assert load_documents(path) == load_documents(path, "Joke")  # .csv defaults to column Joke
    with pytest.raises(ValueError, match=r"no column 'Text'.*\['ID', 'Joke'\]"):
        load_documents(path, "Text")
    text = tmp_path / "jokes.txt"
    text.write_text("first joke\n\n  second joke \n")
    assert load_documents(text) == ["first joke", "second joke"]


def test_default_corpus_is_pyjokes():
    documents = load_documents()
    assert len(documents) > 100 and all(isinstance(d, str) and d for d in documents)
    assert "Chuck" in Vocabulary.from_tokens(tokenize(documents)).index


# --- training parity ------------------------------------------------------------------------


@pytest.mark.slow
def test_training_losses_match_nn_lstm_B16_T4_H128_fp32(corpus):
    vocab, inputs, targets = corpus
    ref, fast = twin_models(len(vocab))
    # dropout is on: the same seed draws the same masks in both (same shapes, same order)
    ref_losses, _ = train(ref, inputs, targets, batch_size=16, seed=3, max_steps=5, progress=False)
    fast_losses, _ = train(fast, inputs, targets, batch_size=16, seed=3, max_steps=5, progress=False)
    assert len(fast_losses) == 5
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    assert fast_losses[-1] < fast_losses[0]
    # Adam moves each weight by about lr * sign(grad) per step, so a gradient entry near zero
    # whose rounding differs can move differently by a fraction of lr (1e-3): 1e-5 is 1% of a step.
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p_fast, p_ref, rtol=0, atol=1e-5, msg=name)


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_cli_same_seed_trains_fast_and_torch_alike(tmp_path, capsys):
    data = tmp_path / "jokes.txt"
    data.write_text("\n".join(sentences(40)))
    losses = {}
    for impl in ("fast", "torch"):
        code, out, err = run_cli(capsys, "--data", str(data), "--impl", impl, "--batch-size", "64",
                                 "--epochs", "2", "--max-steps", "7", "--seed", "5")
        assert code == 0
        assert "epoch 1/2 [" in err and "loss" in err  # the progress bar
        losses[impl] = [float(v) for v in re.findall(r"^epoch \d+/2 loss (\S+)", out, re.M)]
        assert len(losses[impl]) == 2
    # printed with 7 significant digits: rounding stays well below the 1e-5 tolerance
    torch.testing.assert_close(torch.tensor(losses["fast"]), torch.tensor(losses["torch"]), rtol=1e-5, atol=0)


# --- stateful generation --------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["fast", "torch"])
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["fp32", "fp64"]
)
def test_carried_state_matches_one_call_B2_T9(impl, dtype, tol):
    torch.manual_seed(0)
    model = WordLSTM(30, impl=impl).to(dtype).eval()
    tokens = torch.randint(30, (2, 9))
    with torch.no_grad():
        whole, (h_whole, c_whole) = model(tokens)
        parts, state = model(tokens[:, :3])  # a prompt, then one word per call
        pieces = [parts]
        for t in range(3, 9):
            step, state = model(tokens[:, t : t + 1], state)
            pieces.append(step)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=tol, atol=tol)
    torch.testing.assert_close(state[0], h_whole, rtol=tol, atol=tol)
    torch.testing.assert_close(state[1], c_whole, rtol=tol, atol=tol)


def test_generation_reproducible_with_seed(corpus):
    vocab = corpus[0]
    torch.manual_seed(0)
    model = WordLSTM(len(vocab), impl="fast")
    first = generate(model, vocab, "why did the", 20, temperature=1.0, seed=7)
    assert first == generate(model, vocab, "why did the", 20, temperature=1.0, seed=7)
    assert first[:3] == ["why", "did", "the"] and len(first) == 23
    assert all(w in vocab.index for w in first)
    assert first != generate(model, vocab, "why did the", 20, temperature=1.0, seed=8)


def test_greedy_generation_equals_rerunning_the_whole_text(corpus):
    """Carrying (h, c) gives the words the original example's re-run-everything loop gives."""
    vocab = corpus[0]
    torch.manual_seed(0)
    model = WordLSTM(len(vocab), impl="fast").double()  # fp64: no near-tie argmax flips
    words = generate(model, vocab, "a SQL query", 8, temperature=0)
    rerun = "a SQL query".split()
    with torch.no_grad():
        for _ in range(8):
            logits, _ = model(torch.tensor([vocab.encode(rerun)]))
            rerun.append(vocab.words[int(logits[0, -1].argmax())])
    assert words == rerun


# --- checkpoints and errors -----------------------------------------------------------------


def test_fast_checkpoint_loads_into_nn_lstm_model(corpus, tmp_path):
    vocab, inputs, targets = corpus
    torch.manual_seed(0)
    fast = WordLSTM(len(vocab), impl="fast")
    train(fast, inputs, targets, batch_size=16, max_steps=2, progress=False)
    path = tmp_path / "jokes.pt"
    save_checkpoint(path, fast, vocab)
    ref, loaded_vocab = load_checkpoint(path, impl="torch")
    assert type(ref.lstm) is nn.LSTM and type(fast.lstm) is FastBiLSTM
    assert loaded_vocab.words == vocab.words
    fast.eval(), ref.eval()
    with torch.no_grad():
        expected, (h, c) = fast(inputs[:8])
        got, (h_ref, c_ref) = ref(inputs[:8])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_ref, h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_ref, c, rtol=1e-5, atol=1e-6)


def test_unknown_prompt_word_is_a_clear_error(corpus, tmp_path, capsys):
    vocab = corpus[0]
    torch.manual_seed(0)
    model = WordLSTM(len(vocab), impl="fast")
    with pytest.raises(UnknownWordError, match=r"unknown word\(s\) in the prompt: 'sick', 'boats'\."):
        generate(model, vocab, "why sick did boats sick", 5)
    path = tmp_path / "jokes.pt"
    save_checkpoint(path, model, vocab)
    code, out, err = run_cli(capsys, "--load", str(path), "--prompt", "why did the Chicken")
    assert code == 2
    assert "error: unknown word(s) in the prompt: 'Chicken'" in err and "case-sensitive" in err
    code, out, err = run_cli(capsys, "--load", str(path), "--impl", "torch", "--prompt", "why did the",
                             "--next-words", "4", "--seed", "1")
    assert code == 0 and out.splitlines()[-1].startswith("why did the ")
    assert len(out.splitlines()[-1].split()) == 7
