// The entry points of the fused per-step loops (step_loops.cpp), one overload per dtype.
#pragma once

#include <cstdint>

#include "activations.h"

namespace bilstm_native {

// The (storage type, input projection type) pairs and storage types the loops are built for:
// one list for the declarations here and the definitions in step_loops.cpp.
#define FOR_EACH_FORWARD_TYPE(X)                                                                  \
  X(float, float) X(double, double) X(c10::BFloat16, c10::BFloat16) X(c10::BFloat16, float)       \
  X(c10::Half, c10::Half) X(c10::Half, float)
#define FOR_EACH_BACKWARD_TYPE(X) X(float) X(double) X(c10::BFloat16) X(c10::Half)

// Forward: one step of n running rows (see forward_rows in step_loops.cpp), for each storage
// type S and input projection type GX (S, or Acc<S> where a task projected its input itself).
// Without gates (nullptr) it is the inference variant; proj: o * tanh(c) goes to h only, for
// the projection.
#define FORWARD_ROWS_SIGNATURE(S, GX)                                                                          \
  void forward_rows_any(int64_t n, const int64_t* rows, int64_t H, const GX* gx, const int64_t* gx_rows,         \
                        int64_t gx_rs, const Acc<S>* bias, const Acc<S>* hw, S* h, Acc<S>* c, S* out, int64_t rs, \
                        Acc<S>* gates, int64_t g_rs, Acc<S>* cs, bool proj)
#define DECLARE_FORWARD_ROWS(S, GX) FORWARD_ROWS_SIGNATURE(S, GX);
FOR_EACH_FORWARD_TYPE(DECLARE_FORWARD_ROWS)
#undef DECLARE_FORWARD_ROWS

// Backward: one step of n running rows (see backward_rows in step_loops.cpp). Without dg
// (nullptr) the gate gradients go to dgates only.
#define BACKWARD_ROWS_SIGNATURE(S)                                                                             \
  void backward_rows_any(int64_t n, const int64_t* rows, int64_t H, const S* dout, int64_t rs,                  \
                         const Acc<S>* gates, int64_t g_rs, const Acc<S>* cs, const Acc<S>* c_prev, int64_t cp_rs, \
                         Acc<S>* dh, Acc<S>* dc, S* dg, Acc<S>* dgates, bool proj)
#define DECLARE_BACKWARD_ROWS(S) BACKWARD_ROWS_SIGNATURE(S);
FOR_EACH_BACKWARD_TYPE(DECLARE_BACKWARD_ROWS)
#undef DECLARE_BACKWARD_ROWS

// Projection, backward: dh += dout for the n running rows ([n, P]; exact, so any vector width
// gives the same bits), also stored as the step's dh output, the gradient of the projected h.
template <typename S>
inline void add_dout(int64_t n, const int64_t* rows, int64_t P, const S* __restrict__ dout, int64_t rs,
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

// dst[j] = src[j] for j < n, converted between a storage type and its Acc (rounding to nearest
// even where it narrows).
template <typename To, typename From>
inline void convert(int64_t n, const From* __restrict__ src, To* __restrict__ dst) {
  if constexpr (std::is_same_v<To, From>) {
    std::memcpy(dst, src, n * sizeof(To));
  } else {
    for (int64_t j = 0; j < n; ++j) {
      if constexpr (is_reduced<To>)
        dst[j] = narrow_to<To>(src[j]);
      else
        dst[j] = widen(src[j]);
    }
  }
}

}  // namespace bilstm_native
