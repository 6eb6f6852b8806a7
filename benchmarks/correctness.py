"""The correctness gate: every implementation against float64 nn.LSTM on the same inputs."""
import contextlib
import copy
import math

from torch.nn.utils.rnn import PackedSequence

from .implementations import call, output_tensor

# Largest accepted max|impl - ref| / max|ref| against the float64 reference, over outputs,
# final states and weight gradients. fp32: honest implementations measure ~1e-6 on every shape
# here (see NOTES.md), a wrong one (swapped gates, a direction not reversed, one batch tile off)
# 1e-2 to 1; 1e-4 leaves room for long sequences. TF32/fp16 (unit roundoff 2^-11) and bf16
# (2^-8) round every GEMM input: a few hundred roundoffs, first estimates until measured on a GPU.
# Under autocast the GEMM inputs are rounded alike (the weights and inputs kept in fp32 are rounded
# to the autocast dtype inside), so the same bounds hold.
TOLERANCE = {"fp32": 1e-4, "fp32-ieee": 1e-4, "fp32-tf32": 2e-2, "fp16": 2e-2, "bf16": 1e-1,
             "fp16-autocast": 2e-2, "bf16-autocast": 1e-1}


def results_of(model, x, dout, context=contextlib.nullcontext):
    """Output, final states and every weight gradient of one training call (its forward in
    `context()`), as float64."""
    out, (h_n, c_n) = call(model, "training", x, dout, context)
    tensors = {"output": output_tensor(out), "h_n": h_n, "c_n": c_n}
    tensors.update({f"grad {name}": p.grad for name, p in model.named_parameters()})
    return {k: v.detach().double() for k, v in tensors.items()}


def relative_error(result, reference):
    """(worst max|a - r| / max|r| over all tensors, the tensor it came from)."""
    worst, where = 0.0, ""
    for name, r in reference.items():
        a = result.get(name)
        if a is None or a.shape != r.shape:
            return math.inf, f"{name} missing or of the wrong shape"
        err = ((a - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
        if not err <= worst:  # NaN counts as worst
            worst, where = (math.inf if math.isnan(err) else err), name
    return worst, where


def reference_results(base, x, dout):
    """nn.LSTM in float64 (on the same device) on exactly the values the implementations see."""
    ref = copy.deepcopy(base).double()
    if isinstance(x, PackedSequence):
        x = PackedSequence(x.data.double(), x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    else:
        x = x.double()
    return results_of(ref, x, dout.double())


def forward_results_of(model, x, context=contextlib.nullcontext):
    """Output and final states of one inference call, as float64 (a deployed model has no gradients)."""
    with context():
        out, (h_n, c_n) = call(model, "inference", x, None)
    return {"output": output_tensor(out).double(), "h_n": h_n.double(), "c_n": c_n.double()}


def check(model, build_error, case_check, tolerance, context=contextlib.nullcontext, inference_only=False,
          refusal=None):
    """The correctness gate for one implementation on one case (its forward in `context()`):
    fields for its rows. inference_only: the forward's results alone (output, h_n, c_n) against
    the reference's. refusal: for nn.LSTM, the error it raises in this precision on this machine
    whatever the input (implementations.nn_lstm_refusal); raising exactly that marks the rows
    unsupported here, not failed: a limit of torch on this CPU, not a wrong implementation."""
    check_x, check_dout, reference = case_check
    verdict = dict(check_tolerance=tolerance, correct=False)
    if build_error is not None:
        return dict(verdict, error=f"building it: {build_error!r}"[:300])
    try:
        if inference_only:
            result = forward_results_of(model, check_x, context)
            reference = {k: v for k, v in reference.items() if k in result}
        else:
            result = results_of(model, check_x, check_dout, context)
        err, where = relative_error(result, reference)
    except Exception as error:  # noqa: BLE001
        if refusal is not None and repr(error) == refusal:
            return dict(verdict, unsupported=f"unsupported on this machine in this precision: {error!r}"[:300])
        return dict(verdict, error=f"checking it: {error!r}"[:300])
    return dict(verdict, check_rel_err=err, check_worst=where, correct=err <= tolerance)
