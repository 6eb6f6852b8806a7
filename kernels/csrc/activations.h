// Activations and the SIMD macros the fused loops are compiled with (see step_loops.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(BILSTM_NO_CLONES)
#define MULTI_TARGET __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTI_TARGET
#endif
#define ALWAYS_INLINE inline __attribute__((always_inline))
// The loops below read and write through many row pointers that never overlap; without this the
// compiler gives up on vectorizing them (too many run-time alias checks) and runs them scalar.
#define SIMD_LOOP _Pragma("omp simd")

namespace bilstm_native {

// ---------------------------------------------------------------------------------------------
// Activations. fp32: branch-free forms that the compiler vectorizes; NaN propagates (every clamp
// is a comparison-select that lets NaN through), +-inf saturate as in torch.

ALWAYS_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
ALWAYS_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// exp(x): Cephes' expf (range reduction by ln 2, degree-5 polynomial), within ~1 ulp.
ALWAYS_INLINE float exp_f32(float x) {
  const float hi = 88.0f, lo = -87.33654475f;  // e^hi finite; e^lo ~ FLT_MIN (normal)
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float t = xc * 1.44269504088896341f + magic;
  int32_t ni = float_to_bits(t) - float_to_bits(magic);
  float n = t - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * (r * r) + r + 1.0f;
  y = y * bits_to_float((ni + 127) << 23);
  y = x > hi ? INFINITY : y;
  y = x < lo ? 0.0f : y;
  return y;
}

ALWAYS_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

// tanh(x): Cephes' tanhf, within 1.3 ulp: an odd polynomial below |x| = 0.625, 1 - 2/(e^2|x| + 1)
// above, then the sign. Near saturation the backward's 1 - tanh^2 cancels, so an ulp of tanh
// there is a large relative error of a gradient: the rational approximation used before (Eigen,
// MLAS) was up to 4.6 ulp off and put a weight gradient 1.4e-6 from nn.LSTM's (conformance s26).
ALWAYS_INLINE float tanh_act(float x) {
  const float ax = std::fabs(x), z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * ax + ax;
  const float large = 1.0f - 2.0f / (exp_f32(2.0f * ax) + 1.0f);  // exp_f32 saturates to inf: 1
  return std::copysign(ax < 0.625f ? small : large, x);
}

// fp64 is the exactness path: libm's exp and tanh.
ALWAYS_INLINE double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
ALWAYS_INLINE double tanh_act(double x) { return std::tanh(x); }

// ---------------------------------------------------------------------------------------------
// Reduced precision (bf16, fp16). The storage type S of inputs, weights, outputs and saved gates is
// the user's; the gate math, the cell state and every GEMM's accumulation run in Acc<S> = fp32
// (as in cuDNN and oneDNN), and h is rounded to S where it is stored, so the next step's GEMM
// multiplies the rounded h.
template <typename S>
constexpr bool is_reduced = std::is_same_v<S, c10::BFloat16> || std::is_same_v<S, c10::Half>;
template <typename S>
using Acc = std::conditional_t<is_reduced<S>, float, S>;

// S -> Acc<S>: exact.
ALWAYS_INLINE float widen(c10::BFloat16 v) { return bits_to_float(static_cast<int32_t>(uint32_t{v.x} << 16)); }
ALWAYS_INLINE float widen(c10::Half v) { return static_cast<float>(v); }
ALWAYS_INLINE float widen(float v) { return v; }
ALWAYS_INLINE double widen(double v) { return v; }

// Acc<S> -> S, rounding to nearest even; NaN stays NaN (a select, so the loops still vectorize).
template <typename S>
ALWAYS_INLINE S narrow_to(Acc<S> v) {
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    const uint32_t u = static_cast<uint32_t>(float_to_bits(v));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;  // integer compare: no float compare to branch on
    return c10::BFloat16(static_cast<uint16_t>(nan ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
  } else if constexpr (std::is_same_v<S, c10::Half>) {
    return c10::Half(v);
  } else {
    return v;
  }
}

}  // namespace bilstm_native
