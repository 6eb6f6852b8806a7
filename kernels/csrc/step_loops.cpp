// The fused per-step loops: gate nonlinearities, cell and hidden update and every store (forward),
// gate gradients and the state-gradient update (backward), one pass over a task's rows per step.
// Compiled for several instruction sets (MULTI_TARGET); the loader picks one at run time.
#include "step_loops.h"

#include "activations.h"

namespace bilstm_native {

// ---------------------------------------------------------------------------------------------
// Fused per-step loops. Row r of a task is batch row rows[r]; row-major [.., H] state buffers
// are indexed by r, the [T, B, D, F] tensors by rows[r] through a row stride.
//
// The flags are template parameters, picked once per step by the entry points below, so the
// loops themselves never branch. SAVE: also store the activated gates and the cell state for
// the backward (training); without it (inference) the same arithmetic, hence the same bits.
// PROJ (nn.LSTM's proj_size): o * tanh(c) is not yet the step's h but the input of the
// projection GEMM that the caller runs after the loop, so the loop stores it to `h` only.

template <typename S, bool SAVE, bool PROJ>
static ALWAYS_INLINE void forward_rows(
    int64_t n, const int64_t* rows, int64_t H,
    const S* __restrict__ gx, const int64_t* gx_rows, int64_t gx_rs,  // row r's projections at gx + gx_rows[r] * gx_rs
    const S* __restrict__ bias,               // [4H] added to them (zeros where gx holds it already)
    const S* __restrict__ hw,                 // [n, 4H]: h_prev @ W_hh^T of this step
    S* __restrict__ h,                        // [n, H] out: o * tanh(c) (the h state unless PROJ)
    S* __restrict__ c,                        // [n, H] cell state, updated in place
    S* __restrict__ out, int64_t rs,          // out at (t, 0, d), unused with PROJ; rs: row stride of out and cs
    S* __restrict__ gates, int64_t g_rs,      // SAVE: gates at (t, 0, d)
    S* __restrict__ cs) {                     // SAVE: cs at (t, 0, d) (row stride rs)
  const int64_t G = 4 * H;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t b = rows[r];
    const S* __restrict__ x = gx + gx_rows[r] * gx_rs;
    const S* __restrict__ a = hw + r * G;
    S* __restrict__ hr = h + r * H;
    S* __restrict__ cr = c + r * H;
    S* __restrict__ o_row = PROJ ? nullptr : out + b * rs;
    S* __restrict__ g_row = SAVE ? gates + b * g_rs : nullptr;
    S* __restrict__ c_row = SAVE ? cs + b * rs : nullptr;
    SIMD_LOOP
    for (int64_t j = 0; j < H; ++j) {
      S i = sigmoid((x[j] + bias[j]) + a[j]);
      S f = sigmoid((x[H + j] + bias[H + j]) + a[H + j]);
      S g = tanh_act((x[2 * H + j] + bias[2 * H + j]) + a[2 * H + j]);
      S o = sigmoid((x[3 * H + j] + bias[3 * H + j]) + a[3 * H + j]);
      S cn = f * cr[j] + i * g;
      S hn = o * tanh_act(cn);
      if constexpr (SAVE) {
        g_row[j] = i;
        g_row[H + j] = f;
        g_row[2 * H + j] = g;
        g_row[3 * H + j] = o;
        c_row[j] = cn;
      }
      cr[j] = cn;
      hr[j] = hn;
      if constexpr (!PROJ) o_row[j] = hn;
    }
  }
}

// PROJ: dh already holds the whole gradient of o * tanh(c) (the caller added dout, which is P
// wide, before projecting it back through W_hr); without it the loop adds dout itself.
// COPY: also store the gate gradients to the task's own [n, 4H] buffer dg, for the step GEMM;
// without it (a task whose rows are the batch rows in order) that GEMM reads them from dgates.
template <typename S, bool PROJ, bool COPY>
static ALWAYS_INLINE void backward_rows(
    int64_t n, const int64_t* rows, int64_t H,
    const S* __restrict__ dout, int64_t rs,         // dout at (t, 0, d), unused with PROJ; rs: row stride of dout and cs
    const S* __restrict__ gates, int64_t g_rs,      // saved activated gates at (t, 0, d)
    const S* __restrict__ cs,                       // saved cell state at (t, 0, d)
    const S* __restrict__ c_prev, int64_t cp_rs,    // previous cell state: cs at the previous step, or c0
    S* __restrict__ dh,                             // [n, H] in: dL/dh after this step; consumed
    S* __restrict__ dc,                             // [n, H] in/out: dL/dc after -> before this step
    S* __restrict__ dg,                             // COPY: [n, 4H] out, gate gradients for the GEMM
    S* __restrict__ dgates) {                       // dgates at (t, 0, d) (row stride g_rs)
  const int64_t G = 4 * H;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t b = rows[r];
    const S* __restrict__ a = gates + b * g_rs;
    const S* __restrict__ cr = cs + b * rs;
    const S* __restrict__ cp = c_prev + b * cp_rs;
    const S* __restrict__ dor = PROJ ? nullptr : dout + b * rs;
    S* __restrict__ dhr = dh + r * H;
    S* __restrict__ dcr = dc + r * H;
    S* __restrict__ dgr = COPY ? dg + r * G : nullptr;
    S* __restrict__ dgo = dgates + b * g_rs;
    SIMD_LOOP
    for (int64_t j = 0; j < H; ++j) {
      S i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j];
      S tc = tanh_act(cr[j]);
      S dht = dhr[j];
      if constexpr (!PROJ) dht += dor[j];
      S dct = dcr[j] + dht * o * (S(1) - tc * tc);
      S di = dct * g * (i * (S(1) - i));
      S df = dct * cp[j] * (f * (S(1) - f));
      S dgg = dct * i * (S(1) - g * g);
      S d_o = dht * tc * (o * (S(1) - o));
      dcr[j] = dct * f;
      if constexpr (COPY) {
        dgr[j] = di;
        dgr[H + j] = df;
        dgr[2 * H + j] = dgg;
        dgr[3 * H + j] = d_o;
      }
      dgo[j] = di;
      dgo[H + j] = df;
      dgo[2 * H + j] = dgg;
      dgo[3 * H + j] = d_o;
    }
  }
}

// One specialised loop per flag combination, chosen here, outside the loops.
template <typename S, typename... Args>
static ALWAYS_INLINE void forward_rows_for(bool save, bool proj, Args... args) {
  if (save)
    proj ? forward_rows<S, true, true>(args...) : forward_rows<S, true, false>(args...);
  else
    proj ? forward_rows<S, false, true>(args...) : forward_rows<S, false, false>(args...);
}
template <typename S, typename... Args>
static ALWAYS_INLINE void backward_rows_for(bool proj, bool copy, Args... args) {
  if (copy)
    proj ? backward_rows<S, true, true>(args...) : backward_rows<S, false, true>(args...);
  else
    proj ? backward_rows<S, true, false>(args...) : backward_rows<S, false, false>(args...);
}

// The multiversioned entry points (target_clones wants plain functions, not templates). Without
// gates (nullptr) the forward is the inference variant.
MULTI_TARGET void forward_rows_f32(int64_t n, const int64_t* rows, int64_t H, const float* gx,
                                   const int64_t* gx_rows, int64_t gx_rs, const float* bias, const float* hw, float* h,
                                   float* c, float* out, int64_t rs, float* gates, int64_t g_rs, float* cs, bool proj) {
  forward_rows_for<float>(gates != nullptr, proj, n, rows, H, gx, gx_rows, gx_rs, bias, hw, h, c, out, rs, gates, g_rs,
                          cs);
}
MULTI_TARGET void forward_rows_f64(int64_t n, const int64_t* rows, int64_t H, const double* gx,
                                   const int64_t* gx_rows, int64_t gx_rs, const double* bias, const double* hw, double* h,
                                   double* c, double* out, int64_t rs, double* gates, int64_t g_rs, double* cs, bool proj) {
  forward_rows_for<double>(gates != nullptr, proj, n, rows, H, gx, gx_rows, gx_rs, bias, hw, h, c, out, rs, gates, g_rs,
                           cs);
}
MULTI_TARGET void backward_rows_f32(int64_t n, const int64_t* rows, int64_t H, const float* dout, int64_t rs,
                                    const float* gates, int64_t g_rs, const float* cs, const float* c_prev,
                                    int64_t cp_rs, float* dh, float* dc, float* dg, float* dgates, bool proj) {
  backward_rows_for<float>(proj, dg != nullptr, n, rows, H, dout, rs, gates, g_rs, cs, c_prev, cp_rs, dh, dc, dg,
                         dgates);
}
MULTI_TARGET void backward_rows_f64(int64_t n, const int64_t* rows, int64_t H, const double* dout, int64_t rs,
                                    const double* gates, int64_t g_rs, const double* cs, const double* c_prev,
                                    int64_t cp_rs, double* dh, double* dc, double* dg, double* dgates, bool proj) {
  backward_rows_for<double>(proj, dg != nullptr, n, rows, H, dout, rs, gates, g_rs, cs, c_prev, cp_rs, dh, dc, dg,
                         dgates);
}

void forward_rows_any(int64_t n, const int64_t* rows, int64_t H, const float* gx, const int64_t* gx_rows,
                             int64_t gx_rs, const float* bias, const float* hw, float* h, float* c, float* out,
                             int64_t rs, float* gates, int64_t g_rs, float* cs, bool proj) {
  forward_rows_f32(n, rows, H, gx, gx_rows, gx_rs, bias, hw, h, c, out, rs, gates, g_rs, cs, proj);
}
void forward_rows_any(int64_t n, const int64_t* rows, int64_t H, const double* gx, const int64_t* gx_rows,
                             int64_t gx_rs, const double* bias, const double* hw, double* h, double* c,
                             double* out, int64_t rs, double* gates, int64_t g_rs, double* cs, bool proj) {
  forward_rows_f64(n, rows, H, gx, gx_rows, gx_rs, bias, hw, h, c, out, rs, gates, g_rs, cs, proj);
}
void backward_rows_any(int64_t n, const int64_t* rows, int64_t H, const float* dout, int64_t rs,
                              const float* gates, int64_t g_rs, const float* cs, const float* c_prev, int64_t cp_rs,
                              float* dh, float* dc, float* dg, float* dgates, bool proj) {
  backward_rows_f32(n, rows, H, dout, rs, gates, g_rs, cs, c_prev, cp_rs, dh, dc, dg, dgates, proj);
}
void backward_rows_any(int64_t n, const int64_t* rows, int64_t H, const double* dout, int64_t rs,
                              const double* gates, int64_t g_rs, const double* cs, const double* c_prev,
                              int64_t cp_rs, double* dh, double* dc, double* dg, double* dgates, bool proj) {
  backward_rows_f64(n, rows, H, dout, rs, gates, g_rs, cs, c_prev, cp_rs, dh, dc, dg, dgates, proj);
}

}  // namespace bilstm_native
