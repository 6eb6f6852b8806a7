"""ONNX export of models holding FastBiLSTMs (bilstm_fast/export.py), run in ONNX Runtime (and
OpenVINO where installed) at batch sizes and lengths other than the export example's.

Needs the [onnx] extra (onnx, onnxscript, onnxruntime; `make test` installs it): without it every
test here skips and says so. Each dynamo export costs ~3 s on a 2-core CPU, so the option matrix
puts several options into each case instead of one export per option.

Tolerance: the runtime's LSTM kernel against FastBiLSTM's in fp32, both O(1) values after a few
dozen rounded steps: 1e-5 absolute (seen: 1e-7 to 1e-6).
"""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bilstm_fast import FastBiLSTM, unswap_lstm

EXTRA = "needs the [onnx] extra (pip install .[onnx]): onnx, onnxscript and onnxruntime"
onnx = pytest.importorskip("onnx", reason=EXTRA)
ort = pytest.importorskip("onnxruntime", reason=EXTRA)
pytest.importorskip("onnxscript", reason=EXTRA)

ATOL = 1e-5
# the ways to ask for dynamic batch and time: the dynamo exporter with torch.export.Dim
# (dynamic_shapes) or with names (dynamic_axes), the TorchScript exporter with names
EXPORTERS = ["dynamo-shapes", "dynamo-axes", "torchscript"]


def export(model, args, names, dynamic, path, exporter):
    """torch.onnx.export as a user writes it. dynamic: {input name: {axis: "B" or "T"}}."""
    kwargs = dict(input_names=names["inputs"], output_names=names.get("outputs", ["out", "h_n", "c_n"]))
    if exporter == "torchscript":
        torch.onnx.export(model, args, path, dynamo=False, dynamic_axes=dynamic, **kwargs)
    elif exporter == "dynamo-axes":
        torch.onnx.export(model, args, path, dynamo=True, verbose=False, dynamic_axes=dynamic, **kwargs)
    else:
        dims = {}
        shapes = {
            name: {axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in axes.items()}
            for name, axes in dynamic.items()
        }
        torch.onnx.export(model, args, path, dynamo=True, verbose=False, dynamic_shapes=shapes, **kwargs)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)  # full_check: with shape inference
    return graph


def run_onnx(path, names, inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(a) for a in session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})]


def assert_equal_eager(model, path, names, inputs):
    with torch.no_grad():
        expected = model(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = run_onnx(path, names, inputs)
    assert len(got) == len(expected)
    for k, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0, msg=lambda m: f"output {k}: {m}")


def op_types(graph):
    return [node.op_type for node in graph.graph.node]


def opset(graph):
    return next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))


class MnistClassifier(nn.Module):
    """The row-by-row MNIST classifier of bilstm_fast's training CLI: a 2-layer BiLSTM, H=256,
    over 28 rows of 28 pixels, and a Linear on the last step's output."""

    def __init__(self):
        super().__init__()
        self.lstm = FastBiLSTM(28, 256, num_layers=2, batch_first=True)
        self.fc = nn.Linear(512, 10)

    def forward(self, images):  # [B, T, 28] -> logits [B, 10]
        out, _ = self.lstm(images)
        return self.fc(out[:, -1])


class Tagger(nn.Module):
    """A sequence tagger: embedding, BiLSTM, a Linear per step; also returns the final states."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.lstm = FastBiLSTM(32, 48)
        self.fc = nn.Linear(96, 7)

    def forward(self, tokens):  # [T, B] -> tag scores [T, B, 7], h_n, c_n
        out, (h_n, c_n) = self.lstm(self.embed(tokens))
        return self.fc(out), h_n, c_n


class States(nn.Module):
    """A FastBiLSTM's whole result as outputs: out, h_n, c_n (with or without h_0, c_0)."""

    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x, h0=None, c0=None):
        out, (h_n, c_n) = self.lstm(x, None if h0 is None else (h0, c0))
        return out, h_n, c_n


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo-shapes", "torchscript"])
def test_mnist_classifier_and_tagger(exporter, tmp_path):
    """The issue's done-when: both models, both exporters, run at two other batch sizes and
    lengths, equal to eager; one ONNX LSTM node per layer."""
    torch.manual_seed(0)
    mnist = MnistClassifier().eval()
    path = tmp_path / "mnist.onnx"
    names = dict(inputs=["images"], outputs=["logits"])
    graph = export(mnist, (torch.rand(4, 28, 28),), names, {"images": {0: "B", 1: "T"}}, path, exporter)
    assert op_types(graph).count("LSTM") == 2 and opset(graph) >= 14
    for B, T in ((1, 28), (7, 13)):
        assert_equal_eager(mnist, path, names["inputs"], (torch.rand(B, T, 28),))

    tagger = Tagger().eval()
    path = tmp_path / "tagger.onnx"
    names = dict(inputs=["tokens"], outputs=["tags", "h_n", "c_n"])
    dynamic = {"tokens": {0: "T", 1: "B"}}
    graph = export(tagger, (torch.randint(0, 100, (9, 3)),), names, dynamic, path, exporter)
    assert op_types(graph).count("LSTM") == 1
    for T, B in ((1, 1), (23, 5)):
        assert_equal_eager(tagger, path, names["inputs"], (torch.randint(0, 100, (T, B)),))


# Several options per case (each dynamo export costs seconds): with the models above they cover
# 1 and 2 layers, bi- and unidirectional, batch_first, bias=False, given or zero h_0/c_0 and
# dropout (inactive in eval); the first case also asks for dynamic sizes by dynamic_axes.
CASES = {
    "L2-batch_first-dropout-h0": (dict(num_layers=2, batch_first=True, dropout=0.5), True),
    "uni-L2-nobias": (dict(num_layers=2, bidirectional=False, bias=False), False),
}


@pytest.mark.slow
@pytest.mark.parametrize("case, exporter", [
    (case, exporter) for case in CASES for exporter in EXPORTERS
    if exporter != "dynamo-axes" or case == "L2-batch_first-dropout-h0"
])
def test_options(case, exporter, tmp_path):
    config, with_states = CASES[case]
    torch.manual_seed(0)
    lstm = FastBiLSTM(5, 6, **config)
    model = States(lstm).eval()
    L, D, H = lstm.num_layers, 2 if lstm.bidirectional else 1, lstm.hidden_size

    def inputs(B, T):
        x = torch.randn(B, T, 5) if lstm.batch_first else torch.randn(T, B, 5)
        return (x, torch.randn(L * D, B, H), torch.randn(L * D, B, H)) if with_states else (x,)

    names = ["x", "h0", "c0"][:3 if with_states else 1]
    batch, time = (0, 1) if lstm.batch_first else (1, 0)
    dynamic = {"x": {batch: "B", time: "T"}}
    if with_states:
        dynamic.update(h0={1: "B"}, c0={1: "B"})
    path = tmp_path / "model.onnx"
    graph = export(model, inputs(2, 6), dict(inputs=names), dynamic, path, exporter)
    assert op_types(graph).count("LSTM") == L
    for B, T in ((1, 1), (5, 17)):
        assert_equal_eager(model, path, names, inputs(B, T))


@pytest.mark.parametrize("exporter", ["torchscript"])  # the module code around the layers: one exporter is enough
def test_unbatched(exporter, tmp_path):
    torch.manual_seed(0)
    model = States(FastBiLSTM(3, 4)).eval()
    path = tmp_path / "model.onnx"
    export(model, (torch.randn(5, 3),), dict(inputs=["x"]), {"x": {0: "T"}}, path, exporter)
    for T in (1, 12):
        assert_equal_eager(model, path, ["x"], (torch.randn(T, 3),))


@pytest.mark.slow
def test_projection_exports_as_scan(tmp_path):
    """proj_size has no ONNX operator: the dynamo exporter writes one Scan over time per layer,
    both directions in it (one layer here: tracing a Scan's body costs seconds)."""
    torch.manual_seed(0)
    model = States(FastBiLSTM(5, 6, proj_size=3, batch_first=True)).eval()
    path = tmp_path / "model.onnx"
    graph = export(model, (torch.randn(2, 6, 5),), dict(inputs=["x"]), {"x": {0: "B", 1: "T"}}, path, "dynamo-shapes")
    ops = op_types(graph)
    assert "LSTM" not in ops and ops.count("Scan") == 1
    for B, T in ((1, 1), (4, 11)):
        assert_equal_eager(model, path, ["x"], (torch.randn(B, T, 5),))


def test_projection_torchscript_names_the_way_out(tmp_path):
    model = States(FastBiLSTM(5, 6, proj_size=3)).eval()
    with pytest.raises(RuntimeError, match=r"proj_size > 0.*dynamo=True"):
        torch.onnx.export(model, (torch.randn(4, 2, 5),), tmp_path / "m.onnx", dynamo=False)


class Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = FastBiLSTM(5, 6)

    def forward(self, x, lengths):  # the padded-plus-lengths model: pack, run, pad again
        out, _ = self.lstm(pack_padded_sequence(x, lengths, enforce_sorted=False))
        return pad_packed_sequence(out, total_length=x.shape[0])[0]


def test_packed_input_says_what_to_do(tmp_path):
    """The TorchScript exporter traces pack_padded_sequence and reaches FastBiLSTM, which refuses
    and names both ways out (torch.export itself fails at pack_padded_sequence, nn.LSTM's too)."""
    args = (torch.randn(4, 2, 5), torch.tensor([4, 2]))
    with pytest.raises(RuntimeError, match=r"PackedSequence.*padded batch.*unswap_lstm.*dynamo=False"):
        torch.onnx.export(Packed().eval(), args, tmp_path / "m.onnx", dynamo=False)


def test_unswapped_copy_exports_lengths(tmp_path):
    """The way out named for per-sequence lengths works: an nn.LSTM copy exports to an LSTM node
    fed sequence_lens, equal to FastBiLSTM on the packed batch."""
    torch.manual_seed(0)
    model = Packed().eval()
    path = tmp_path / "m.onnx"
    args = (torch.randn(4, 2, 5), torch.tensor([4, 2]))
    torch.onnx.export(unswap_lstm(copy.deepcopy(model)), args, path, dynamo=False, input_names=["x", "lengths"],
                      dynamic_axes={"x": {0: "T", 1: "B"}, "lengths": {0: "B"}})
    lstm = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "LSTM")
    assert lstm.input[4]  # sequence_lens is wired
    assert_equal_eager(model, path, ["x", "lengths"], (torch.randn(9, 3, 5), torch.tensor([9, 1, 5])))


@pytest.mark.slow
def test_training_dropout_refused(tmp_path):
    """The dynamo exporter captures the mode the model is in: in training, dropout would make the
    graph compute something else, so the export stops and says model.eval()."""
    model = States(FastBiLSTM(5, 6, num_layers=2, dropout=0.5))  # training mode
    with pytest.raises(Exception, match=r"dropout=0.5.*model.eval\(\)"):
        torch.onnx.export(model, (torch.randn(4, 2, 5),), tmp_path / "m.onnx", dynamo=True, verbose=False)


def test_bfloat16_refused(tmp_path):
    model = States(FastBiLSTM(5, 6, dtype=torch.bfloat16)).eval()
    with pytest.raises(RuntimeError, match=r"bfloat16.*float32.*model.float\(\)"):
        torch.onnx.export(model, (torch.randn(4, 2, 5, dtype=torch.bfloat16),), tmp_path / "m.onnx", dynamo=False)


def test_eager_untouched_after_export(tmp_path):
    """An export leaves nothing behind: the same module computes the same bits afterwards."""
    torch.manual_seed(0)
    model = States(FastBiLSTM(5, 6)).eval()
    x = torch.randn(7, 3, 5)
    with torch.no_grad():
        before = model(x)
    torch.onnx.export(model, (x,), tmp_path / "m.onnx", dynamo=False)
    with torch.no_grad():
        after = model(x)
    for b, a in zip(before, after):
        assert torch.equal(b, a)


# Weights of this size stay outside the dynamo exporter's constant folding (onnxscript folds
# tensors of at most 8192 elements): W_ih is 4*64 x 48 = 12288 elements, W_hh 16384
LARGE = dict(input_size=48, hidden_size=64)


@pytest.mark.slow
def test_parametrized_weights_computed_in_the_graph(tmp_path):
    """Weights that are not the module's parameters themselves (here weight_norm's) have no
    values at export time: the graph computes them, still equal to eager, and the export warns
    that runtimes needing constant LSTM weights will refuse it at large sizes."""
    torch.manual_seed(0)
    lstm = FastBiLSTM(5, 6)
    torch.nn.utils.parametrizations.weight_norm(lstm, "weight_hh_l0")
    model = States(lstm).eval()
    path = tmp_path / "model.onnx"
    with pytest.warns(UserWarning, match=r"not the module's own parameters.*remove_parametrizations"):
        export(model, (torch.randn(6, 2, 5),), dict(inputs=["x"]), {"x": {0: "T", 1: "B"}}, path, "dynamo-shapes")
    assert_equal_eager(model, path, ["x"], (torch.randn(13, 4, 5),))


@pytest.mark.parametrize("exporter", [pytest.param("dynamo-shapes", marks=pytest.mark.slow), "torchscript"])
def test_large_weights_are_initializers(exporter, tmp_path):
    """At sizes the exporters do not fold, each LSTM node still reads W, R and B as plain
    initializers (already in ONNX's gate order): what OpenVINO's CPU plugin needs to compile the
    node and ONNX Runtime's quantize_dynamic to quantize it. Run in ONNX Runtime (fp32 and int8)
    and OpenVINO at other batch sizes and lengths."""
    torch.manual_seed(0)
    model = States(FastBiLSTM(**LARGE, num_layers=2, batch_first=True)).eval()
    x = torch.randn(3, 11, 48)
    with torch.no_grad():
        expected = model(x)
    attributes = set(vars(model.lstm))
    path = tmp_path / "model.onnx"
    graph = export(model, (torch.randn(2, 6, 48),), dict(inputs=["x"]), {"x": {0: "B", 1: "T"}}, path, exporter)
    assert set(vars(model.lstm)) == attributes  # the weights computed for the export are not kept
    with torch.no_grad():
        assert all(torch.equal(a, e) for a, e in zip(model(x), expected))
    initializers = {init.name for init in graph.graph.initializer}
    lstms = [node for node in graph.graph.node if node.op_type == "LSTM"]
    assert len(lstms) == 2
    for node in lstms:
        assert all(name in initializers for name in node.input[1:4]), list(node.input)
    assert_equal_eager(model, path, ["x"], (torch.randn(5, 17, 48),))

    ov = pytest.importorskip("openvino", reason="OpenVINO not installed (pip install .[openvino])")
    # f32 inference: on CPUs with bf16 units OpenVINO would otherwise run in bf16 (error ~3e-3)
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled([x.numpy()])
    for port, e in zip(compiled.outputs, expected):
        torch.testing.assert_close(torch.from_numpy(result[port]), e, atol=ATOL, rtol=0)


def test_onnxruntime_quantizes_the_lstm(tmp_path):
    """ONNX Runtime's dynamic quantization turns the exported LSTM into its int8 LSTM
    (DynamicQuantizeLSTM: int8 weights, u8 inputs and h quantized per step).

    reduce_range (7-bit weights): x86 CPUs without VNNI multiply u8 by s8 with VPMADDUBSW, whose
    pairwise int16 sums saturate for full-range weights (ONNX Runtime's quantization docs); on
    such a CPU (AVX2, no VNNI) the full-range model errs by 0.27 here. With it the error is
    measured at 1e-2 (torch's qint8 LSTM: 1e-2 too): 7-bit weight and 8-bit input rounding is a
    ~1% error per gate pre-activation, carried through 11 steps into |h|, |c| < 1. 5e-2 leaves
    margin for other CPUs' kernels; a wrong graph (misordered gates) errs by O(1)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.manual_seed(0)
    model = States(FastBiLSTM(**LARGE)).eval()
    path, quantized = tmp_path / "model.onnx", tmp_path / "int8.onnx"
    export(model, (torch.randn(6, 2, 48),), dict(inputs=["x"]), {"x": {0: "T", 1: "B"}}, path, "torchscript")
    quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8, reduce_range=True)
    assert "DynamicQuantizeLSTM" in op_types(onnx.load(str(quantized)))
    x = torch.randn(11, 3, 48)
    with torch.no_grad():
        expected = model(x)
    for got, e in zip(run_onnx(quantized, ["x"], (x,)), expected):
        torch.testing.assert_close(got, e, atol=5e-2, rtol=0)
