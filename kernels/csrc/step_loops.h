// The entry points of the fused per-step loops (step_loops.cpp), one overload per dtype.
#pragma once

#include <cstdint>

#include "activations.h"

namespace bilstm_native {

// Forward: one step of n running rows (see forward_rows in step_loops.cpp). Without gates
// (nullptr) it is the inference variant; proj: o * tanh(c) goes to h only, for the projection.
void forward_rows_any(int64_t n, const int64_t* rows, int64_t H, const float* gx, const int64_t* gx_rows,
                      int64_t gx_rs, const float* bias, const float* hw, float* h, float* c, float* out,
                      int64_t rs, float* gates, int64_t g_rs, float* cs, bool proj);
void forward_rows_any(int64_t n, const int64_t* rows, int64_t H, const double* gx, const int64_t* gx_rows,
                      int64_t gx_rs, const double* bias, const double* hw, double* h, double* c,
                      double* out, int64_t rs, double* gates, int64_t g_rs, double* cs, bool proj);
// Backward: one step of n running rows (see backward_rows in step_loops.cpp). Without dg
// (nullptr) the gate gradients go to dgates only.
void backward_rows_any(int64_t n, const int64_t* rows, int64_t H, const float* dout, int64_t rs,
                       const float* gates, int64_t g_rs, const float* cs, const float* c_prev, int64_t cp_rs,
                       float* dh, float* dc, float* dg, float* dgates, bool proj);
void backward_rows_any(int64_t n, const int64_t* rows, int64_t H, const double* dout, int64_t rs,
                       const double* gates, int64_t g_rs, const double* cs, const double* c_prev,
                       int64_t cp_rs, double* dh, double* dc, double* dg, double* dgates, bool proj);

// Projection, backward: dh += dout for the n running rows ([n, P]; exact, so any vector width
// gives the same bits), also stored as the step's dh output, the gradient of the projected h.
template <typename S>
static void add_dout(int64_t n, const int64_t* rows, int64_t P, const S* __restrict__ dout, int64_t rs,
                     S* __restrict__ dh, S* __restrict__ dh_out) {
  for (int64_t r = 0; r < n; ++r) {
    const S* __restrict__ dor = dout + rows[r] * rs;
    S* __restrict__ dhr = dh + r * P;
    S* __restrict__ dho = dh_out + rows[r] * rs;
    SIMD_LOOP
    for (int64_t j = 0; j < P; ++j) {
      const S v = dhr[j] + dor[j];
      dhr[j] = v;
      dho[j] = v;
    }
  }
}

}  // namespace bilstm_native
