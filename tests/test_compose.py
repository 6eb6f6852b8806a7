"""FastBiLSTM composes with the rest of PyTorch: torch.compile (no graph break), autocast,
determinism, CUDA graphs (GPU only)."""
import pytest
import torch
from torch import nn

from bilstm_fast import FastBiLSTM
from helpers import nn_lstm_bf16_autocast, nn_lstm_bf16_autocast_available


class Classifier(nn.Module):
    """The MNIST-style model in miniature: BiLSTM, then a linear head on the last step."""

    def __init__(self, I=5, H=8, layers=2):
        super().__init__()
        self.rnn = FastBiLSTM(I, H, num_layers=layers, batch_first=True)
        self.head = nn.Linear(2 * H, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def classifier_step(model, x):
    model.zero_grad()
    x = x.detach().requires_grad_()
    y = model(x)
    (y * torch.arange(1, y.numel() + 1, dtype=y.dtype, device=y.device).view_as(y)).sum().backward()
    return [y.detach(), x.grad] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = Classifier()
    x = torch.randn(4, 6, 5)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager = classifier_step(model, x)
    compiled = classifier_step(torch.compile(model, fullgraph=True), x)
    # inductor fuses the GEMM epilogues and reductions differently: a few fp32 ulps
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compile_fullgraph_inference_matches_eager():
    """Under no_grad the model runs the inference op: compiled, still one graph, same numbers."""
    torch.manual_seed(0)
    model = Classifier()
    x = torch.randn(4, 6, 5)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_cpu_bf16_autocast_matches_nn_lstm():
    """bf16 out, h_n and c_n, as nn.LSTM gives them (oneDNN's bf16 LSTM); on a CPU without it,
    where nn.LSTM raises, the values are set against nn.LSTM's ATen path (helpers.nn_lstm_bf16_autocast)."""
    torch.manual_seed(0)
    ref = nn.LSTM(6, 10, num_layers=2, bidirectional=True)
    fast = FastBiLSTM.from_lstm(ref, copy=True)
    x = torch.randn(7, 3, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f_out, (f_h, f_c) = fast(x)
    with nn_lstm_bf16_autocast(), torch.autocast("cpu", dtype=torch.bfloat16):
        r_out, (r_h, r_c) = ref(x)
    assert (f_out.dtype, f_h.dtype, f_c.dtype) == (torch.bfloat16,) * 3
    if nn_lstm_bf16_autocast_available():
        assert (r_out.dtype, r_h.dtype, r_c.dtype) == (torch.bfloat16,) * 3
    # bf16 keeps 8 significant bits (relative step 2^-8 = 0.004); both sides round their weights
    # and inputs to it (and the outputs, but for nn.LSTM's ATen path), and |values| < 1 here
    for f, r in ((f_out, r_out), (f_h, r_h), (f_c, r_c)):
        torch.testing.assert_close(f.float(), r.float(), rtol=0, atol=1.6e-2)
    f_out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and fast.weight_ih_l0.grad.dtype == torch.float32


@pytest.mark.slow
def test_bitwise_repeatable_and_deterministic_mode():
    torch.manual_seed(0)
    model = Classifier(I=4, H=12)
    x = torch.randn(5, 9, 4)
    first = classifier_step(model, x)
    torch.use_deterministic_algorithms(True)
    try:
        second = classifier_step(model, x)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_jit_script_says_it_is_unsupported():
    with pytest.raises(RuntimeError, match="torch.jit.script"):
        torch.jit.script(FastBiLSTM(3, 4))


@pytest.mark.cuda
def test_cuda_compile_matches_eager():
    torch.manual_seed(0)
    model = Classifier().cuda()
    x = torch.randn(4, 6, 5, device="cuda")
    eager = classifier_step(model, x)
    compiled = classifier_step(torch.compile(model, fullgraph=True), x)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_autocast_dtype_matches_nn_lstm(dtype):
    torch.manual_seed(0)
    ref = nn.LSTM(16, 32, num_layers=2, bidirectional=True).cuda()
    fast = FastBiLSTM.from_lstm(ref, copy=True)
    x = torch.randn(9, 4, 16, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        r_out, (r_h, r_c) = ref(x)
        f_out, (f_h, f_c) = fast(x)
    assert (f_out.dtype, f_h.dtype, f_c.dtype) == (r_out.dtype, r_h.dtype, r_c.dtype)
    atol = 4e-3 if dtype == torch.float16 else 3e-2  # 11 vs 8 significant bits
    torch.testing.assert_close(f_out.float(), r_out.float(), rtol=0, atol=atol)


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay_training_step():
    torch.manual_seed(0)
    model = Classifier(I=8, H=32).cuda()
    static_x = torch.randn(4, 10, 8, device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: replays see the same weights

    def step():
        opt.zero_grad(set_to_none=False)
        model(static_x).square().sum().backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: compile kernels, allocate grads
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    static_grads = [p.grad for p in model.parameters()]  # the tensors the graph writes
    graph.replay()
    torch.cuda.synchronize()
    replayed = [g.clone() for g in static_grads]
    for p in model.parameters():
        p.grad = None
    model(static_x).square().sum().backward()  # the same step, eagerly
    for r, p in zip(replayed, model.parameters()):
        assert torch.equal(r, p.grad)
