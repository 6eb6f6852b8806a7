// The backward sweep of one layer, all directions (recurrence_backward), and the GEMMs after it
// (layer_gradients).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include <algorithm>
#include <array>
#include <cstring>

#include "forward.h"  // StepHooks, LayerBackward
#include "native.h"
#include "step_gemm.h"
#include "step_loops.h"
#include "tasks.h"

namespace bilstm_native {

// ---------------------------------------------------------------------------------------------
// Backward
//
// Projection: the carried dh is P wide. A step adds dout to it (and saves that, the returned dh),
// takes it back through the projection (one GEMM, dh @ W_hr, into a [rows, H] buffer) and runs the
// fused loop on the result; dh = dgates @ W_hh then gives the previous step's P-wide dh as before.

// One task's backward sweep of one layer: its rows of direction task.d, every step, last first.
// Types: dout in the storage type S; the saved gates and cell states (cs, c0), the carried state
// gradients, dgates and dh0, dc0 in Acc<S>: the weight and bias gradients are formed from unrounded
// gate gradients (with bf16 ones, the bias gradient of H=1 was 1.5x nn.LSTM's error). With bf16 or fp16 no projection.
template <typename S>
static void backward_task_impl(const LayerBackward& layer, const Task& task, const std::vector<int64_t>& len,
                               const StepHooks& hooks) {
  using A = Acc<S>;
  const at::Tensor &dout = layer.dout, &w_hh = layer.w_hh, &w_hr = layer.w_hr, &gates = layer.gates,
                   &dgates = layer.dgates;
  const int64_t T = gates.size(0), B = gates.size(1), D = gates.size(2), G = gates.size(3), H = G / 4;
  const bool proj = w_hr.defined();
  TORCH_CHECK(!(proj && is_reduced<S>), "native recurrence: no projection in reduced precision");
  const int64_t P = layer.dh_n.size(2);
  const int64_t g_rs = D * G, c_rs = D * H, h_rs = D * P;  // row strides: gates, cs, dout (and dhs)
  const int64_t g_ts = B * g_rs, c_ts = B * c_rs, h_ts = B * h_rs;
  const S* dout_p = dout.data_ptr<S>();
  const A* gates_p = gates.data_ptr<A>();
  const A* cs_p = layer.cs.data_ptr<A>();
  const A* c0_p = layer.c0.data_ptr<A>();
  const A* dhn_p = layer.dh_n.data_ptr<A>();
  const A* dcn_p = layer.dc_n.data_ptr<A>();
  A* dgates_p = dgates.data_ptr<A>();
  A* dh0_p = layer.dh0.data_ptr<A>();
  A* dc0_p = layer.dc0.data_ptr<A>();
  S* dhs_p = proj ? layer.dhs.data_ptr<S>() : nullptr;
  const auto acc_options = gates.options().dtype(c10::CppTypeToScalarType<A>::value);
  const int64_t d = task.d, nr = static_cast<int64_t>(task.rows.size());
  const int64_t* rows = task.rows.data();
  const StepGemmFor<S> recurrent(w_hh[d], T, nr);  // dh_prev = dgates @ W_hh [4H, P]
  c10::optional<StepGemm<S>> projection;             // du = dh @ W_hr [P, H] (fp32 and fp64 only)
  if constexpr (!is_reduced<S>)
    if (proj) projection.emplace(w_hr[d], T);
  at::Tensor dh = at::empty({nr, P}, acc_options);
  at::Tensor dc = at::empty({nr, H}, acc_options);
  // rows in batch order: the step GEMM reads the gate gradients from dgates itself (row stride
  // D * 4H), else from a copy the loop also stores in task order
  const bool in_order = !is_reduced<S> && task.in_batch_order();
  at::Tensor dg = in_order ? at::Tensor() : at::empty({nr, G}, dout.options());
  // with a projection, the gradient of o * tanh(c): du = dh @ W_hr [nr, H]
  at::Tensor du = proj ? at::empty({nr, H}, acc_options) : dh;
  A* dh_p = dh.data_ptr<A>();
  A* dc_p = dc.data_ptr<A>();
  for (int64_t r = 0; r < nr; ++r) {
    std::memcpy(dh_p + r * P, dhn_p + (d * B + rows[r]) * P, P * sizeof(A));
    std::memcpy(dc_p + r * H, dcn_p + (d * B + rows[r]) * H, H * sizeof(A));
  }
  int64_t n = 0;
  for (int64_t s = T - 1; s >= 0; --s) {  // the forward's steps, last first
    const int64_t t = d == 0 ? s : T - 1 - s;
    // a wavefront stage's dout comes a block at a time (blocks of steps counted from the last)
    if (hooks.before_block && (T - 1 - s) % hooks.block_steps == 0) {
      const int64_t count = std::min(hooks.block_steps, s + 1);
      hooks.before_block(task, d == 0 ? s - count + 1 : t, count);
    }
    n = active_rows(task, len, t, n);
    if (n > 0) {
      const A* c_prev;
      int64_t cp_rs;
      if (s == 0) {
        c_prev = c0_p + d * B * H;
        cp_rs = H;
      } else {  // the neighbouring saved state: for a sequence starting at len-1 going back, c0
        const int64_t tp = d == 0 ? t - 1 : t + 1;
        c_prev = cs_p + tp * c_ts + d * H;
        cp_rs = c_rs;
      }
      const S* dout_t = dout_p + t * h_ts + d * P;
      if constexpr (!is_reduced<S>) {
        if (proj) {
          add_dout(n, rows, P, dout_t, h_rs, dh_p, dhs_p + t * h_ts + d * P);
          at::Tensor du_rows = du.narrow(0, 0, n);
          projection->run(dh.narrow(0, 0, n), du_rows);
        }
      }
      // the loop's dout and cs share the row stride c_rs; with a projection it does not read dout
      backward_rows_any(n, rows, H, proj ? nullptr : dout_t, c_rs, gates_p + t * g_ts + d * G, g_rs,
                        cs_p + t * c_ts + d * H, c_prev, cp_rs, du.data_ptr<A>(), dc_p,
                        in_order ? nullptr : dg.data_ptr<S>(), dgates_p + t * g_ts + d * G, proj);
      at::Tensor dh_rows = dh.narrow(0, 0, n);
      recurrent.run(in_order ? dgates[t].select(1, d).narrow(0, 0, n) : dg.narrow(0, 0, n), dh_rows);
    }
    // rows past their end: no gate gradient (nor dh); the state gradients pass through untouched
    for (int64_t r = n; r < nr; ++r) {
      std::memset(dgates_p + t * g_ts + rows[r] * g_rs + d * G, 0, G * sizeof(A));
      if (proj) std::memset(dhs_p + t * h_ts + rows[r] * h_rs + d * P, 0, P * sizeof(S));
    }
    if (hooks.after_step) hooks.after_step(task, t);
  }
  for (int64_t r = 0; r < nr; ++r) {
    std::memcpy(dh0_p + (d * B + rows[r]) * P, dh_p + r * P, P * sizeof(A));
    std::memcpy(dc0_p + (d * B + rows[r]) * H, dc_p + r * H, H * sizeof(A));
  }
}

void backward_task(const LayerBackward& layer, const Task& task, const std::vector<int64_t>& len,
                   const StepHooks& hooks) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, layer.dout.scalar_type(), "native backward", [&] {
    backward_task_impl<scalar_t>(layer, task, len, hooks);
  });
}

// -> dgates, dh0, dc0, and with a projection dh [T, B, D, P].
std::vector<at::Tensor> recurrence_backward(const at::Tensor& dout_in, const at::Tensor& dh_n_in,
                                            const at::Tensor& dc_n_in, const at::Tensor& w_hh_in,
                                            const at::Tensor& gates_in, const at::Tensor& cs_in,
                                            const at::Tensor& c0_in, const c10::optional<at::Tensor>& lengths,
                                            const c10::optional<at::Tensor>& w_hr_in) {
  check_inputs(gates_in, w_hh_in, w_hr_in);
  const auto dt = dout_in.scalar_type(), acc = acc_dtype(dt);
  const auto opts = dout_in.options();
  at::Tensor gates = gates_in.to(acc).contiguous();
  at::Tensor cs = cs_in.to(acc).contiguous();
  at::Tensor dout = dout_in.to(dt).contiguous();
  at::Tensor dh_n = dh_n_in.to(acc).contiguous();
  at::Tensor dc_n = dc_n_in.to(acc).contiguous();
  at::Tensor w_hh = w_hh_in.to(dt).contiguous();
  at::Tensor w_hr = projection_weight(w_hr_in, dt);
  at::Tensor c0 = c0_in.to(acc).contiguous();
  const int64_t T = gates.size(0), B = gates.size(1), D = gates.size(2), G = gates.size(3), H = G / 4;
  const int64_t P = w_hh.size(2);
  TORCH_CHECK(dout.sizes() == at::IntArrayRef({T, B, D, P}) && dh_n.sizes() == at::IntArrayRef({D, B, P}) &&
                  dc_n.sizes() == at::IntArrayRef({D, B, H}),
              "native recurrence: dout must be [T, B, D, P], dh_n [D, B, P] and dc_n [D, B, H]");
  at::Tensor dgates = at::empty({T, B, D, G}, opts.dtype(acc));
  at::Tensor dh0 = at::empty({D, B, P}, opts.dtype(acc));
  at::Tensor dc0 = at::empty({D, B, H}, opts.dtype(acc));
  at::Tensor dhs = w_hr.defined() ? at::empty({T, B, D, P}, opts) : at::Tensor();
  if (T > 0 && B > 0 && H > 0) {
    const std::vector<int64_t> len = lengths_vector(lengths, B, T);
    const LayerBackward layer{dout, dh_n, dc_n, w_hh, w_hr, gates, cs, c0, dgates, dh0, dc0, dhs};
    const std::vector<Task> tasks = make_tasks(len, D);
    const StepHooks none;
    run_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t k) { backward_task(layer, tasks[k], len, none); });
  } else {
    dgates.zero_();
    dh0.copy_(dh_n);
    dc0.copy_(dc_n);
    if (dhs.defined()) dhs.zero_();
  }
  if (dhs.defined()) return {dgates, dh0, dc0, dhs};
  return {dgates, dh0, dc0};
}

// ---------------------------------------------------------------------------------------------
// The backward's GEMMs after the recurrence

// Rows per partial GEMM of a weight gradient, as bilstm_fast/function.py's sum_over_rows: a
// reduction over T*B rows as one GEMM per block and a sum of the blocks, so the accuracy does not
// depend on how the BLAS library orders one long reduction.
constexpr int64_t ROW_BLOCK = 512;

// out = a.t() @ b, a [n, M], b [n, N] (row-strided matrices, taken as they lie), out [M, N] with
// unit column stride. bf16: one GEMM over all rows (ATen hands bf16 mm to oneDNN, which
// accumulates in fp32 and rounds once). (fp16 arrives widened to fp32.)
static void sum_over_rows(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kBFloat16) {
    at::mm_out(out, a.t(), b);
    return;
  }
  const int64_t n = a.size(0);
  at::mm_out(out, a.narrow(0, 0, std::min(n, ROW_BLOCK)).t(), b.narrow(0, 0, std::min(n, ROW_BLOCK)));
  for (int64_t start = ROW_BLOCK; start < n; start += ROW_BLOCK) {
    const int64_t rows = std::min(ROW_BLOCK, n - start);
    out.add_(at::mm(a.narrow(0, start, rows).t(), b.narrow(0, start, rows)));
  }
}

// dx = dgates @ W_ih (both directions: K = D*4H) and, per direction d, dW_ih[d] = dgates_d^T x,
// dW_hh[d] = dgates_d^T h_prev_d and db[d] = the column sums of dgates_d, each a fresh tensor,
// undefined where its need flag is false. The GEMMs run as single-threaded tasks in one
// fork/join instead of one 2-thread team per GEMM (whose split of a GEMM costs efficiency, and
// which waits on a busy core at every GEMM). Task (d, s) takes slice s of direction d's gate
// columns (slices = threads / directions, at least one), that is rows of its weight gradients,
// summed over all T*B rows in the same ROW_BLOCKs whatever the slicing (so the numbers do not
// depend on the thread count), and one slice of dx's rows. A split of the T*B rows into whole
// blocks instead was unbalanced wherever the blocks do not divide evenly (word-LM, 700 rows: 512
// and 188). dgates [T, B, D, 4H], x [T, B, I], h_prev [T, B, D, H] (undefined when no W_hh
// gradient is needed), w_ih [D, 4H, I]. Returns [dx, then dW_ih, dW_hh, db per direction].
std::vector<at::Tensor> layer_gradients(const at::Tensor& dgates_in, const at::Tensor& x_in,
                                        const c10::optional<at::Tensor>& h_prev_in, const at::Tensor& w_ih_in,
                                        bool need_dx, const std::vector<bool>& need_w_ih,
                                        const std::vector<bool>& need_w_hh, const std::vector<bool>& need_bias) {
  TORCH_CHECK(dgates_in.dim() == 4 && x_in.dim() == 3 && w_ih_in.dim() == 3, "native layer_gradients: bad ranks");
  const int64_t T = dgates_in.size(0), B = dgates_in.size(1), D = dgates_in.size(2), G = dgates_in.size(3);
  const int64_t I = x_in.size(2), n = T * B;
  TORCH_CHECK(static_cast<int64_t>(need_w_ih.size()) == D && static_cast<int64_t>(need_w_hh.size()) == D &&
                  static_cast<int64_t>(need_bias.size()) == D,
              "native layer_gradients: one need flag per direction");
  // bf16 and fp16: dgates come in fp32 (from recurrence_backward); the GEMMs multiply them rounded
  // to the weights' dtype, the bias gradient sums them as they are
  // fp16: the GEMMs in fp32 on widened operands (oneDNN has no fp16 GEMM without AVX512-FP16, and
  // ATen's fallback made an MNIST training step 1.6 s)
  const auto dt = w_ih_in.scalar_type(), gemm_dt = gradient_gemm_dtype(dt);
  at::Tensor dgates_acc = dgates_in.to(acc_dtype(dt)).contiguous();
  at::Tensor dgates = dgates_acc.to(gemm_dt);
  at::Tensor x = x_in.to(gemm_dt).contiguous().view({n, I});
  at::Tensor h_prev =
      h_prev_in.has_value() && h_prev_in->defined() ? h_prev_in->to(gemm_dt).contiguous() : at::Tensor();
  TORCH_CHECK(h_prev.defined() || std::none_of(need_w_hh.begin(), need_w_hh.end(), [](bool b) { return b; }),
              "native layer_gradients: h_prev is needed for W_hh's gradient");
  at::Tensor w_ih = w_ih_in.to(gemm_dt).contiguous();
  const int64_t slices = std::max<int64_t>(1, std::min(at::get_num_threads() / D, G));
  // per direction: dW_ih, dW_hh, db, written slice by slice
  std::vector<std::array<at::Tensor, 3>> grads(D);
  for (int64_t d = 0; d < D; ++d) {
    if (need_w_ih[d]) grads[d][0] = at::empty({G, I}, dgates.options());
    if (need_w_hh[d]) grads[d][1] = at::empty({G, h_prev.size(3)}, dgates.options());
    if (need_bias[d]) grads[d][2] = at::empty({G}, dgates_acc.options());
  }
  at::Tensor dx;
  if (need_dx) dx = at::empty({T, B, I}, dgates.options());
  at::parallel_for(0, D * slices, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t d = k / slices, s = k % slices;
      if (need_dx) {  // the k-th of D * slices slices of dx's rows
        const int64_t first = n * k / (D * slices), rows = n * (k + 1) / (D * slices) - first;
        at::Tensor dx_rows = dx.view({n, I}).narrow(0, first, rows);
        at::mm_out(dx_rows, dgates.view({n, D * G}).narrow(0, first, rows), w_ih.view({D * G, I}));
      }
      const int64_t col = G * s / slices, cols = G * (s + 1) / slices - col;  // slices <= G: cols >= 1
      // strided views: row stride D*4H
      at::Tensor dg = dgates.select(2, d).reshape({n, G}).narrow(1, col, cols);
      if (need_w_ih[d]) sum_over_rows(grads[d][0].narrow(0, col, cols), dg, x);
      if (need_w_hh[d]) sum_over_rows(grads[d][1].narrow(0, col, cols), dg, h_prev.select(2, d).reshape({n, h_prev.size(3)}));
      if (need_bias[d]) {
        at::Tensor db = grads[d][2].narrow(0, col, cols);
        at::sum_out(db, dgates_acc.select(2, d).reshape({n, G}).narrow(1, col, cols), {0});
      }
    }
  });
  std::vector<at::Tensor> result(1 + 3 * D);
  result[0] = dx.defined() ? dx.to(dt) : dx;
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = 0; j < 3; ++j)
      result[1 + 3 * d + j] = grads[d][j].defined() ? grads[d][j].to(dt) : grads[d][j];  // to dt where the GEMMs or db ran wider
  return result;
}


}  // namespace bilstm_native
