// The fused per-step loops: gate nonlinearities, cell and hidden update and every store (forward),
// gate gradients and the state-gradient update (backward), one pass over a task's rows per step.
// Compiled for several instruction sets (MULTI_TARGET); the loader picks one at run time.
#include "step_loops.h"

#include "activations.h"

namespace bilstm_native {

// ---------------------------------------------------------------------------------------------
// Row r of a task is batch row rows[r]; row-major [.., H] state buffers are indexed by r, the
// [T, B, D, F] tensors by rows[r] through a row stride.
//
// The flags are template parameters, picked once per step by the entry points below, so the
// loops themselves never branch. SAVE: also store the activated gates and the cell state for
// the backward (training); without it (inference) the same arithmetic, hence the same bits.
// PROJ (nn.LSTM's proj_size): o * tanh(c) is not yet the step's h but the input of the
// projection GEMM that the caller runs after the loop, so the loop stores it to `h` only.
//
// Types: S is the storage type (of out and h), A = Acc<S> the type of the math, the cell state
// (c, cs), the saved gates, the GEMM results (hw) and the bias; GX, the type of the input
// projections, is S where the caller made them (the contract's gx) and A where a task projected
// them itself. For fp32 and fp64 all three are one type.

template <typename S, typename GX, bool SAVE, bool PROJ>
static ALWAYS_INLINE void forward_rows(
    int64_t n, const int64_t* rows, int64_t H,
    const GX* __restrict__ gx, const int64_t* gx_rows, int64_t gx_rs,  // row r's projections at gx + gx_rows[r] * gx_rs
    const Acc<S>* __restrict__ bias,          // [4H] added to them (zeros where gx holds it already)
    const Acc<S>* __restrict__ hw,            // [n, 4H]: h_prev @ W_hh^T of this step
    S* __restrict__ h,                        // [n, H] out: o * tanh(c) (the h state unless PROJ)
    Acc<S>* __restrict__ c,                   // [n, H] cell state, updated in place
    S* __restrict__ out, int64_t rs,          // out at (t, 0, d), unused with PROJ; rs: row stride of out and cs
    Acc<S>* __restrict__ gates, int64_t g_rs,  // SAVE: gates at (t, 0, d)
    Acc<S>* __restrict__ cs) {                // SAVE: cs at (t, 0, d) (row stride rs)
  using A = Acc<S>;
  const int64_t G = 4 * H;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t b = rows[r];
    const GX* __restrict__ x = gx + gx_rows[r] * gx_rs;
    const A* __restrict__ a = hw + r * G;
    S* __restrict__ hr = h + r * H;
    A* __restrict__ cr = c + r * H;
    S* __restrict__ o_row = PROJ ? nullptr : out + b * rs;
    A* __restrict__ g_row = SAVE ? gates + b * g_rs : nullptr;
    A* __restrict__ c_row = SAVE ? cs + b * rs : nullptr;
    SIMD_LOOP
    for (int64_t j = 0; j < H; ++j) {
      A i = sigmoid((widen(x[j]) + bias[j]) + a[j]);
      A f = sigmoid((widen(x[H + j]) + bias[H + j]) + a[H + j]);
      A g = tanh_act((widen(x[2 * H + j]) + bias[2 * H + j]) + a[2 * H + j]);
      A o = sigmoid((widen(x[3 * H + j]) + bias[3 * H + j]) + a[3 * H + j]);
      A cn = f * cr[j] + i * g;
      A hn = o * tanh_act(cn);
      if constexpr (SAVE) {
        g_row[j] = i;
        g_row[H + j] = f;
        g_row[2 * H + j] = g;
        g_row[3 * H + j] = o;
        c_row[j] = cn;
      }
      cr[j] = cn;
      // rounded at each store: GCC leaves the loop scalar when one rounded value (an S object)
      // is stored twice
      hr[j] = narrow_to<S>(hn);
      if constexpr (!PROJ) o_row[j] = narrow_to<S>(hn);
    }
  }
}

// PROJ: dh already holds the whole gradient of o * tanh(c) (the caller added dout, which is P
// wide, before projecting it back through W_hr); without it the loop adds dout itself.
// COPY: also store the gate gradients to the task's own [n, 4H] buffer dg, for the step GEMM;
// without it (a task whose rows are the batch rows in order) that GEMM reads them from dgates.
// Types as forward_rows: dout and the GEMM's copy of the gate gradients (dg) in S; the saved gates
// and cell states, the carried state gradients (dh, dc) and dgates in A. With bf16 or fp16 the
// loop always stores dg (the GEMM multiplies S).
template <typename S, bool PROJ, bool COPY>
static ALWAYS_INLINE void backward_rows(
    int64_t n, const int64_t* rows, int64_t H,
    const S* __restrict__ dout, int64_t rs,         // dout at (t, 0, d), unused with PROJ; rs: row stride of dout and cs
    const Acc<S>* __restrict__ gates, int64_t g_rs,  // saved activated gates at (t, 0, d)
    const Acc<S>* __restrict__ cs,                  // saved cell state at (t, 0, d)
    const Acc<S>* __restrict__ c_prev, int64_t cp_rs,  // previous cell state: cs at the previous step, or c0
    Acc<S>* __restrict__ dh,                        // [n, H] in: dL/dh after this step; consumed
    Acc<S>* __restrict__ dc,                        // [n, H] in/out: dL/dc after -> before this step
    S* __restrict__ dg,                             // COPY: [n, 4H] out, gate gradients for the GEMM
    Acc<S>* __restrict__ dgates) {                  // dgates at (t, 0, d) (row stride g_rs)
  using A = Acc<S>;
  const int64_t G = 4 * H;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t b = rows[r];
    const A* __restrict__ a = gates + b * g_rs;
    const A* __restrict__ cr = cs + b * rs;
    const A* __restrict__ cp = c_prev + b * cp_rs;
    const S* __restrict__ dor = PROJ ? nullptr : dout + b * rs;
    A* __restrict__ dhr = dh + r * H;
    A* __restrict__ dcr = dc + r * H;
    S* __restrict__ dgr = COPY ? dg + r * G : nullptr;
    A* __restrict__ dgo = dgates + b * g_rs;
    SIMD_LOOP
    for (int64_t j = 0; j < H; ++j) {
      A i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j];
      A tc = tanh_act(cr[j]);
      A dht = dhr[j];
      if constexpr (!PROJ) dht += widen(dor[j]);
      A dct = dcr[j] + dht * o * (A(1) - tc * tc);
      A di = dct * g * (i * (A(1) - i));
      A df = dct * cp[j] * (f * (A(1) - f));
      A dgg = dct * i * (A(1) - g * g);
      A d_o = dht * tc * (o * (A(1) - o));
      dcr[j] = dct * f;
      if constexpr (COPY) {
        dgr[j] = narrow_to<S>(di);
        dgr[H + j] = narrow_to<S>(df);
        dgr[2 * H + j] = narrow_to<S>(dgg);
        dgr[3 * H + j] = narrow_to<S>(d_o);
      }
      dgo[j] = di;
      dgo[H + j] = df;
      dgo[2 * H + j] = dgg;
      dgo[3 * H + j] = d_o;
    }
  }
}

// One specialised loop per flag combination, chosen here, outside the loops.
template <typename S, typename GX, typename... Args>
static ALWAYS_INLINE void forward_rows_for(bool save, bool proj, Args... args) {
  if (save)
    proj ? forward_rows<S, GX, true, true>(args...) : forward_rows<S, GX, true, false>(args...);
  else
    proj ? forward_rows<S, GX, false, true>(args...) : forward_rows<S, GX, false, false>(args...);
}
template <typename S, typename... Args>
static ALWAYS_INLINE void backward_rows_for(bool proj, bool copy, Args... args) {
  if (copy)
    proj ? backward_rows<S, true, true>(args...) : backward_rows<S, false, true>(args...);
  else
    proj ? backward_rows<S, true, false>(args...) : backward_rows<S, false, false>(args...);
}

// The multiversioned entry points (target_clones wants plain functions, not templates), one per
// (storage type, input projection type). Without gates (nullptr) the forward is the inference variant.
#define FORWARD_ROWS(S, GX)                                                                                  \
  MULTI_TARGET FORWARD_ROWS_SIGNATURE(S, GX) {                                                                 \
    forward_rows_for<S, GX>(gates != nullptr, proj, n, rows, H, gx, gx_rows, gx_rs, bias, hw, h, c, out, rs, gates, \
                            g_rs, cs);                                                                         \
  }
FOR_EACH_FORWARD_TYPE(FORWARD_ROWS)
#undef FORWARD_ROWS

#define BACKWARD_ROWS(S)                                                                                       \
  MULTI_TARGET BACKWARD_ROWS_SIGNATURE(S) {                                                                    \
    backward_rows_for<S>(proj, dg != nullptr, n, rows, H, dout, rs, gates, g_rs, cs, c_prev, cp_rs, dh, dc, dg, \
                         dgates);                                                                              \
  }
FOR_EACH_BACKWARD_TYPE(BACKWARD_ROWS)
#undef BACKWARD_ROWS

}  // namespace bilstm_native
