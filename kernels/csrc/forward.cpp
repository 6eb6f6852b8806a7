// The forward sweep of one layer, all directions (recurrence_forward, layer_forward).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>

#include <cstring>
#include <numeric>

#include "forward.h"
#include "native.h"
#include "step_gemm.h"
#include "step_loops.h"
#include "tasks.h"

namespace bilstm_native {

// ---------------------------------------------------------------------------------------------
// Forward
//
// Projection (w_hr defined, [D, P, H]): the h state and out are P wide (P = H without one), and
// a step is two GEMMs: the fused loop leaves o * tanh(c) in a task-private [rows, H] buffer, and
// h = that @ W_hr^T goes into the h state, from which the running rows' out is copied.

// Where a task's input projections come from: see Projections (forward.h).
// Bytes of projections per block. Large enough that the W_ih GEMM has hundreds of rows and
// streams W_ih only T / steps times; small enough to stay in the last-level cache between its
// projection and its steps, and under glibc's largest mmap threshold (32 MB), so after the first
// call the block is recycled heap memory instead of fresh pages that fault on first touch.
constexpr int64_t BLOCK_BYTES = int64_t{4} << 20;

// The projections of one task, a block of steps at a time (layer_forward's source), in Acc<S>:
// with bf16 or fp16 input they are never rounded to it.
template <typename S>
class ProjectionBlocks {
 public:
  ProjectionBlocks(const Projections& p, const Task& task, const std::vector<int64_t>& len, int64_t T,
                   const StepHooks& hooks)
      : task_(task), len_(len), hooks_(hooks), T_(T), B_(p.x.size(1)), I_(p.x.size(2)), G_(p.w_ih.size(1)),
        nr_(static_cast<int64_t>(task.rows.size())),
        steps_(std::max<int64_t>(1, std::min({T, BLOCK_BYTES / (nr_ * G_ * int64_t(sizeof(Acc<S>))),
                                              hooks.block_steps > 0 ? hooks.block_steps : T}))),
        gemm_(p.w_ih[task.d].t(), (T + steps_ - 1) / steps_), x_(p.x),
        block_(at::empty({steps_ * nr_, G_}, p.x.options().dtype(c10::CppTypeToScalarType<Acc<S>>::value))),
        order_(nr_) {
    std::iota(order_.begin(), order_.end(), int64_t{0});
    contiguous_rows_ = nr_ == B_ && task.in_batch_order();
  }

  // Row r's projections at step s (time t) are at base + index()[r] * G.
  const Acc<S>* base(int64_t s, int64_t t) {
    if (s % steps_ == 0) project(s);
    return block_.data_ptr<Acc<S>>() + (t - t_lo_) * rows_ * G_;
  }
  const int64_t* index() const { return order_.data(); }
  int64_t row_stride() const { return G_; }

 private:
  // The block of steps s .. s + steps - 1, for the rows running at its earliest time (the most:
  // a row runs at t while t < len), laid out [time, row, 4H].
  void project(int64_t s) {
    const int64_t count = std::min(steps_, T_ - s);
    t_lo_ = task_.d == 0 ? s : T_ - s - count;
    rows_ = 0;
    while (rows_ < nr_ && len_[task_.rows[rows_]] > t_lo_) ++rows_;
    if (rows_ == 0) return;
    if (hooks_.before_block) hooks_.before_block(task_, t_lo_, count);
    at::Tensor xb;
    if (contiguous_rows_ && rows_ == B_) {  // all of x's rows at these steps, as they lie
      xb = x_.narrow(0, t_lo_, count).view({count * B_, I_});
    } else {
      if (!gathered_.defined()) gathered_ = at::empty({steps_ * nr_, I_}, x_.options());
      const S* x_p = x_.data_ptr<S>();
      S* g_p = gathered_.data_ptr<S>();
      for (int64_t k = 0; k < count; ++k)
        for (int64_t r = 0; r < rows_; ++r)
          std::memcpy(g_p + (k * rows_ + r) * I_, x_p + ((t_lo_ + k) * B_ + task_.rows[r]) * I_, I_ * sizeof(S));
      xb = gathered_.narrow(0, 0, count * rows_);
    }
    at::Tensor out = block_.narrow(0, 0, count * rows_);
    gemm_.run(xb, out);
  }

  const Task& task_;
  const std::vector<int64_t>& len_;
  const StepHooks& hooks_;
  const int64_t T_, B_, I_, G_, nr_, steps_;
  const StepGemmFor<S> gemm_;
  at::Tensor x_, block_, gathered_;
  std::vector<int64_t> order_;
  bool contiguous_rows_;
  int64_t t_lo_ = 0, rows_ = 0;
};

// One task's sweep of one layer: its rows (task.rows) of direction task.d, every step.
// Types: out, h_n and c_n in the storage type S, the cell state (c0 in, cs saved) and the saved
// gates in Acc<S> (see activations.h). With bf16 or fp16 no projection (the Python side runs
// those layers on the vectorized backend).
template <typename S>
static void forward_task_impl(const LayerForward& layer, const Task& task, const std::vector<int64_t>& len,
                              const StepHooks& hooks) {
  using A = Acc<S>;
  const Projections& input = layer.input;
  const at::Tensor &w_hh = layer.w_hh, &w_hr = layer.w_hr, &out = layer.out;
  const bool save = layer.save;
  const int64_t T = out.size(0), B = out.size(1), D = out.size(2), H = layer.c0.size(2), G = 4 * H;
  const bool proj = w_hr.defined();
  TORCH_CHECK(!(proj && is_reduced<S>), "native recurrence: no projection in reduced precision");
  const int64_t P = layer.h0.size(2);
  const int64_t gx_rs = D * G, c_rs = D * H, out_rs = D * P;  // row (batch) strides of gx and gates, cs, out
  const int64_t gx_ts = B * gx_rs, c_ts = B * c_rs, out_ts = B * out_rs;
  const bool fused = !input.gx.defined();
  const S* gx_p = fused ? nullptr : input.gx.data_ptr<S>();
  S* out_p = out.data_ptr<S>();
  A* gates_p = save ? layer.gates.data_ptr<A>() : nullptr;
  A* cs_p = save ? layer.cs.data_ptr<A>() : nullptr;
  const S* h0_p = layer.h0.data_ptr<S>();
  const A* c0_p = layer.c0.data_ptr<A>();
  S* hn_p = layer.h_n.data_ptr<S>();
  S* cn_p = layer.c_n.data_ptr<S>();
  const auto acc_options = out.options().dtype(c10::CppTypeToScalarType<A>::value);
  const int64_t d = task.d, nr = static_cast<int64_t>(task.rows.size());
  const int64_t* rows = task.rows.data();
  const StepGemmFor<S> recurrent(w_hh[d].t(), T, nr);  // h_prev @ W_hh^T
  c10::optional<StepGemm<S>> projection;                 // u @ W_hr^T (fp32 and fp64 only)
  if constexpr (!is_reduced<S>)
    if (proj) projection.emplace(w_hr[d].t(), T);
  c10::optional<ProjectionBlocks<S>> blocks;
  if (fused) blocks.emplace(input, task, len, T, hooks);
  // the fused loop adds the bias to a block's projections; gx holds it already
  const at::Tensor bias = fused && input.bias.defined() ? input.bias[d].to(acc_options).contiguous()
                                                        : at::zeros({G}, acc_options);
  // task-private state, allocated on the thread that uses it: h [nr, P] (in S: the next step's
  // GEMM reads it), c [nr, H], hw [nr, 4H], and with a projection the unprojected h, u [nr, H]
  at::Tensor h = at::empty({nr, P}, out.options());
  at::Tensor c = at::empty({nr, H}, acc_options);
  at::Tensor hw = at::empty({nr, G}, acc_options);
  at::Tensor u = proj ? at::empty({nr, H}, out.options()) : h;
  S* h_p = h.data_ptr<S>();
  A* c_p = c.data_ptr<A>();
  for (int64_t r = 0; r < nr; ++r) {
    std::memcpy(h_p + r * P, h0_p + (d * B + rows[r]) * P, P * sizeof(S));
    std::memcpy(c_p + r * H, c0_p + (d * B + rows[r]) * H, H * sizeof(A));
  }
  int64_t n = nr;
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = d == 0 ? s : T - 1 - s;
    n = active_rows(task, len, t, n);
    S* out_t = out_p + t * out_ts + d * P;
    if (n > 0) {
      at::Tensor hw_n = hw.narrow(0, 0, n);
      recurrent.run(h.narrow(0, 0, n), hw_n);
      // the loop's out and cs share the row stride c_rs; with a projection it does not write out
      A* gates_t = save ? gates_p + t * gx_ts + d * G : nullptr;
      A* cs_t = save ? cs_p + t * c_ts + d * H : nullptr;
      if (fused)
        forward_rows_any(n, rows, H, blocks->base(s, t), blocks->index(), blocks->row_stride(), bias.data_ptr<A>(),
                         hw.data_ptr<A>(), u.data_ptr<S>(), c_p, proj ? nullptr : out_t, c_rs, gates_t, gx_rs, cs_t,
                         proj);
      else
        forward_rows_any(n, rows, H, gx_p + t * gx_ts + d * G, rows, gx_rs, bias.data_ptr<A>(), hw.data_ptr<A>(),
                         u.data_ptr<S>(), c_p, proj ? nullptr : out_t, c_rs, gates_t, gx_rs, cs_t, proj);
      if (proj) {
        at::Tensor h_rows = h.narrow(0, 0, n);
        projection->run(u.narrow(0, 0, n), h_rows);
        for (int64_t r = 0; r < n; ++r) std::memcpy(out_t + rows[r] * out_rs, h_p + r * P, P * sizeof(S));
      }
    } else if (fused) {
      blocks->base(s, t);  // keeps the blocks in step (a block starts at its first step)
    }
    // rows past their end (t >= len): zero output; the saved cell state carries the state
    // (the final one going forward, c0 going back); the gates are never read there
    for (int64_t r = n; r < nr; ++r) {
      const int64_t b = rows[r];
      std::memset(out_t + b * out_rs, 0, P * sizeof(S));
      if (save) {
        std::memcpy(cs_p + t * c_ts + b * c_rs + d * H, c_p + r * H, H * sizeof(A));
        std::memset(gates_p + t * gx_ts + b * gx_rs + d * G, 0, G * sizeof(A));
      }
    }
    if (hooks.after_step) hooks.after_step(task, t);
  }
  for (int64_t r = 0; r < nr; ++r) {
    std::memcpy(hn_p + (d * B + rows[r]) * P, h_p + r * P, P * sizeof(S));
    convert(H, c_p + r * H, cn_p + (d * B + rows[r]) * H);
  }
}

void forward_task(const LayerForward& layer, const Task& task, const std::vector<int64_t>& len,
                  const StepHooks& hooks) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, layer.out.scalar_type(), "native forward", [&] {
    forward_task_impl<scalar_t>(layer, task, len, hooks);
  });
}

// gx [T, B, D, 4H]; w_hh [D, 4H, P] with P = H, or with a projection w_hr [D, P, H].
bool supported_dtype(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf;
}

at::ScalarType acc_dtype(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const at::Tensor& gx, const at::Tensor& w_hh, const c10::optional<at::Tensor>& w_hr) {
  TORCH_CHECK(gx.device().is_cpu(), "native recurrence: CPU tensors only");
  TORCH_CHECK(gx.dim() == 4 && gx.size(3) % 4 == 0, "native recurrence: gx must be [T, B, D, 4H]");
  TORCH_CHECK(supported_dtype(gx.scalar_type()), "native recurrence: float32, float64, bfloat16 or float16 only");
  const int64_t D = gx.size(2), G = gx.size(3), H = G / 4;
  int64_t P = H;
  if (w_hr.has_value()) {
    TORCH_CHECK(w_hr->dim() == 3 && w_hr->size(0) == D && w_hr->size(2) == H,
                "native recurrence: w_hr must be [D, P, H]");
    P = w_hr->size(1);
  }
  TORCH_CHECK(w_hh.dim() == 3 && w_hh.size(0) == D && w_hh.size(1) == G && w_hh.size(2) == P,
              "native recurrence: w_hh must be [D, 4H, H], or [D, 4H, P] with w_hr [D, P, H]");
}

// w_hr, in the given dtype and contiguous, or an undefined tensor without a projection.
at::Tensor projection_weight(const c10::optional<at::Tensor>& w_hr, const at::ScalarType dtype) {
  return w_hr.has_value() ? w_hr->to(dtype).contiguous() : at::Tensor();
}

// The sweep for either source of projections; T, B, D, H and the options from that source.
static std::vector<at::Tensor> forward_sweep(const Projections& input, const at::Tensor& w_hh_in,
                                             const c10::optional<at::Tensor>& w_hr_in, const at::Tensor& h0_in,
                                             const at::Tensor& c0_in, const c10::optional<at::Tensor>& lengths,
                                             bool save, int64_t T, int64_t B, int64_t D, int64_t H,
                                             const at::TensorOptions& opts) {
  const auto dt = opts.dtype().toScalarType();
  at::Tensor w_hh = w_hh_in.to(dt).contiguous();
  at::Tensor w_hr = projection_weight(w_hr_in, dt);
  at::Tensor h0 = h0_in.to(dt).contiguous();
  at::Tensor c0 = c0_in.to(acc_dtype(dt)).contiguous();
  const int64_t G = 4 * H, P = w_hh.size(2);
  TORCH_CHECK(h0.sizes() == at::IntArrayRef({D, B, P}) && c0.sizes() == at::IntArrayRef({D, B, H}),
              "native recurrence: h0 must be [D, B, P] and c0 [D, B, H]");
  at::Tensor out = at::empty({T, B, D, P}, opts);
  at::Tensor h_n = at::empty({D, B, P}, opts);
  at::Tensor c_n = at::empty({D, B, H}, opts);
  at::Tensor gates, cs;
  if (save) {
    gates = at::empty({T, B, D, G}, opts.dtype(acc_dtype(dt)));
    cs = at::empty({T, B, D, H}, opts.dtype(acc_dtype(dt)));
  }
  if (T > 0 && B > 0 && H > 0) {
    const std::vector<int64_t> len = lengths_vector(lengths, B, T);
    const LayerForward layer{input, w_hh, w_hr, h0, c0, out, h_n, c_n, gates, cs, save};
    const std::vector<Task> tasks = make_tasks(len, D);
    const StepHooks none;
    run_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t k) { forward_task(layer, tasks[k], len, none); });
  } else {
    h_n.copy_(h0);
    c_n.copy_(c0);
  }
  return {out, h_n, c_n, gates, cs};
}

std::vector<at::Tensor> recurrence_forward(const at::Tensor& gx, const at::Tensor& w_hh, const at::Tensor& h0,
                                           const at::Tensor& c0, const c10::optional<at::Tensor>& lengths,
                                           bool save, const c10::optional<at::Tensor>& w_hr) {
  check_inputs(gx, w_hh, w_hr);
  Projections input;
  input.gx = gx.contiguous();
  return forward_sweep(input, w_hh, w_hr, h0, c0, lengths, save, gx.size(0), gx.size(1), gx.size(2),
                       gx.size(3) / 4, gx.options());
}

// The layer's forward from x: the recurrence contract's forward with the input projection done by
// the tasks themselves (see Projections). x [T, B, I], w_ih [D, 4H, I], bias [D, 4H] or None; no
// output projection (layers with one take the contract's path).
std::vector<at::Tensor> layer_forward(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
                                      const c10::optional<at::Tensor>& lengths, bool save) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3, "native layer_forward: x must be a CPU [T, B, I] tensor");
  TORCH_CHECK(supported_dtype(x.scalar_type()), "native layer_forward: float32, float64, bfloat16 or float16 only");
  TORCH_CHECK(w_ih.dim() == 3 && w_ih.size(2) == x.size(2) && w_ih.size(1) % 4 == 0,
              "native layer_forward: w_ih must be [D, 4H, I]");
  const int64_t D = w_ih.size(0), H = w_ih.size(1) / 4;
  TORCH_CHECK(w_hh.dim() == 3 && w_hh.size(0) == D && w_hh.size(1) == 4 * H && w_hh.size(2) == H,
              "native layer_forward: w_hh must be [D, 4H, H]");
  const auto dt = x.scalar_type();
  Projections input;
  input.x = x.contiguous();
  input.w_ih = w_ih.to(dt).contiguous();
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == D && bias->size(1) == 4 * H,
                "native layer_forward: bias must be [D, 4H]");
    input.bias = bias->to(acc_dtype(dt)).contiguous();  // bf16/fp16: the fp32 sum of b_ih and b_hh
  }
  return forward_sweep(input, w_hh, c10::nullopt, h0, c0, lengths, save, x.size(0), x.size(1), D, H, x.options());
}

}  // namespace bilstm_native
