// The step GEMM of the recurrence: C = A @ W for a weight fixed for the whole call.
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>  // cpublas::brgemm
#include <ATen/ops/mm.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "activations.h"  // is_reduced

namespace bilstm_native {

// The step GEMM: C[n, N] = A[n, K] @ W for a weight W [K, N] fixed for the whole call (W_hh^T
// going forward, W_hh going back, W_ih^T for the input projection of a block of steps).
//
// Packed (the recurrent weight, fp32, at least PACK_MIN elements, a task of PACK_MIN_ROWS to
// PACK_MAX_ROWS rows): W is packed once per call into column panels of PANEL columns, each
// [K, PANEL] contiguous, and every step runs ATen's cpublas::brgemm (oneDNN's JIT micro-kernel where
// torch has it, ATen's gemm otherwise) panel by panel, over K in blocks of at most K_BLOCK. MKL's
// sgemm repacks W on every call, a large share of a step of a few rows, and more so while the other
// core runs its own direction (the two share the cache and memory bandwidth). Measured with both
// directions running, 2 threads (benchmarks/NOTES.md attempts 23 and 27): forward H=512 B32
// 0.90x, H=768 B16 0.85x, B2 0.65x, H=256 B64 0.96x; backward (K = 4H) in K blocks of 512 H=768 B16
// 0.78x, H=512 B32 0.89x, H=256 B64 0.87x, B2 0.63x (unblocked: 0.90x, 0.96x: brgemm over all of
// K = 2048-3072 loses most of the gain); no gain from 256 rows on (MKL's packing pays for itself
// there). A single row stays on MKL: its GEMV streams W at the memory bandwidth already, and the
// panels lose 5-15% (B1 H768: forward 1.07x, backward 1.16x packed). A brgemm kernel is generated
// once per shape and thread (tens of microseconds) and cached by ATen, so calls whose running row
// count changes from step to step (lengths) pay that once per distinct count.
// Otherwise at::mm_out on W made contiguous once; a weight used for a call or two (streaming
// generation) is multiplied as it is: a copy would cost more than it saves.
constexpr int64_t PANEL = 32;
constexpr int64_t K_BLOCK = 512;
// 64 KB of fp32 (H = 64): from H = 64 to 256, 8-32 rows, the panels took 0.5-0.85 of MKL sgemm's
// time on an AVX2 CPU (benchmarks/NOTES.md attempt 39); the bound was 1 MB (H = 256) before.
constexpr int64_t PACK_MIN = int64_t{1} << 14;
constexpr int64_t PACK_MIN_ROWS = 2;
constexpr int64_t PACK_MAX_ROWS = 128;

// w [R, N, ...] in column panels of `width` columns: [panels, R, width, ...], each panel
// contiguous; a last partial panel's columns past N are zero and never read back. The full panels
// go in one copy from a [full, R, width, ...] view of w: one panel at a time took twice as long
// (2.8 ms against 1.3 for W_hh^T at H = 650, paid by every task of every call).
inline at::Tensor column_panels(const at::Tensor& w, int64_t width) {
  const int64_t N = w.size(1), panels = (N + width - 1) / width, full = N / width;
  std::vector<int64_t> sizes = w.sizes().vec();
  sizes[1] = width;
  sizes.insert(sizes.begin(), panels);
  at::Tensor out = at::empty(sizes, w.options());
  out.narrow(0, 0, full).copy_(w.narrow(1, 0, full * width).unflatten(1, {full, width}).movedim(1, 0));
  if (full < panels) {
    out[full].zero_();
    out[full].narrow(1, 0, N - full * width).copy_(w.narrow(1, full * width, N - full * width));
  }
  return out;
}

template <typename S>
class StepGemm {
 public:
  // rows: the most rows a call multiplies, for a recurrent weight (0: not one, never packed)
  StepGemm(const at::Tensor& w, int64_t calls, int64_t rows = 0) : K_(w.size(0)), N_(w.size(1)) {
    use_panels_ = std::is_same<S, float>::value && K_ * N_ >= PACK_MIN && calls > 2 && rows >= PACK_MIN_ROWS &&
                  rows <= PACK_MAX_ROWS;
    if (!use_panels_) {
      w_ = calls > 2 ? w.contiguous() : w;
      return;
    }
    w_ = column_panels(w, PANEL);
  }

  // c = a @ W; a: [n, K] with unit column stride, c: [n, N] rows contiguous
  void run(const at::Tensor& a, at::Tensor& c) const {
    const int64_t n = a.size(0);
    if (!use_panels_) {
      at::mm_out(c, a, w_);
      return;
    }
    const float* a_p = reinterpret_cast<const float*>(a.data_ptr());
    const float* w_p = reinterpret_cast<const float*>(w_.data_ptr());
    float* c_p = reinterpret_cast<float*>(c.data_ptr());
    for (int64_t j = 0; j * PANEL < N_; ++j) {
      const int64_t width = std::min(PANEL, N_ - j * PANEL);
      for (int64_t k = 0; k < K_; k += K_BLOCK) {
        at::native::cpublas::brgemm(n, width, std::min(K_BLOCK, K_ - k), a.stride(0), PANEL, N_, /*add_C=*/k > 0,
                                    a_p + k, w_p + (j * K_ + k) * PANEL, c_p + j * PANEL);
      }
    }
  }

 private:
  int64_t K_, N_;
  bool use_panels_;
  at::Tensor w_;
};

// ---------------------------------------------------------------------------------------------
// Reduced precision (bf16, fp16): C [n, N] in fp32 = A [n, K] @ W with A and W in the storage type,
// products accumulated in fp32 (the products of two bf16 or fp16 numbers are exact in fp32).
//
// bf16 where ATen's brgemm runs it with W in the VNNI layout (oneDNN's micro-kernel: AVX512-BF16's
// dot-product instruction, or AMX tiles; emulated on plain AVX-512) and K is even: W is packed
// once per call into [K/2, N, 2] (rows 2k and 2k+1 interleaved) and every step is one brgemm.
// Elsewhere (fp16, odd K, a CPU or build without the micro-kernel, torch.backends.mkldnn off): W is
// widened to fp32 once and A at every step, and the fp32 StepGemm multiplies them, which is exact
// in the same sense and gives the same numbers to the order of the fp32 sums.

// Whether ATen's brgemm multiplies bf16 with B in the VNNI layout on this CPU and build. Checked
// once, by running it on a small problem of small integers (exact in bf16 and fp32) against the
// plain sums: a CPU without the micro-kernel throws, and one whose layout differed would give other
// numbers. torch.backends.mkldnn.enabled, which switches the micro-kernel off, is read at every call.
inline bool vnni_brgemm_usable() {
  static const bool works = [] {
    constexpr int64_t M = 3, K = 8, N = 20;
    std::vector<c10::BFloat16> a(M * K), packed(K * N);
    std::vector<float> b(K * N), c(M * N, 0.0f);
    for (int64_t i = 0; i < M * K; ++i) a[i] = c10::BFloat16(static_cast<float>(i % 7 - 3));
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < N; ++j) {
        b[k * N + j] = static_cast<float>((k * N + j) % 5 - 2);
        packed[(k / 2) * N * 2 + j * 2 + k % 2] = c10::BFloat16(b[k * N + j]);
      }
    try {
      at::native::cpublas::brgemm(M, N, K, K, N, N, false, a.data(), packed.data(), c.data(), true);
      at::native::cpublas::brgemm_release();
    } catch (const std::exception&) {
      return false;
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < N; ++j) {
        float expected = 0.0f;
        for (int64_t k = 0; k < K; ++k) expected += static_cast<float>(a[m * K + k]) * b[k * N + j];
        if (c[m * N + j] != expected) return false;
      }
    return true;
  }();
  return works && at::globalContext().userEnabledMkldnn();
}

// W [K, N] (K even) in the VNNI layout of bf16 brgemm: [K/2, N, 2], rows 2k and 2k+1 interleaved.
// A transposed weight (W = w^T, w [N, K] contiguous: W_hh^T going forward, W_ih^T) holds each pair
// as one 32-bit word of w, so the layout is a transpose of 32-bit words (ATen's blocked transpose;
// a strided copy of pairs took 3-4x as long, 1.8 ms at H=320, paid every call).
inline at::Tensor vnni_pack(const at::Tensor& w) {
  const int64_t K = w.size(0), N = w.size(1);
  if (w.stride(0) == 1 && w.stride(1) == K)
    return w.t().view(at::kInt).t().contiguous().view(w.scalar_type()).view({K / 2, N, 2});
  const at::Tensor src = w.contiguous();
  at::Tensor out = at::empty({K / 2, N, 2}, w.options());
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src.data_ptr());
  uint16_t* d = reinterpret_cast<uint16_t*>(out.data_ptr());
  for (int64_t k = 0; k < K / 2; ++k) {
    const uint16_t* __restrict__ r0 = s + 2 * k * N;
    const uint16_t* __restrict__ r1 = r0 + N;
    uint16_t* __restrict__ o = d + 2 * k * N;
    for (int64_t j = 0; j < N; ++j) {
      o[2 * j] = r0[j];
      o[2 * j + 1] = r1[j];
    }
  }
  return out;
}

// Columns per panel of a VNNI-packed weight: each panel [K/2, PANEL, 2] is contiguous, so a step's
// brgemm walks W panel by panel through consecutive memory instead of K/2 rows N * 4 bytes apart
// (a page apart, and another TLB entry, every row once N is large), for weights over
// PANELS_FROM_BYTES. BILSTM_FAST_BF16_PANEL overrides the width (0: one brgemm over all N columns).
constexpr int64_t PANELS_FROM_BYTES = int64_t{1} << 20;  // 1 MB: H = 362 for W_hh^T
inline int64_t bf16_panel() {
  static const int64_t value = [] {
    const char* env = std::getenv("BILSTM_FAST_BF16_PANEL");
    return env != nullptr ? static_cast<int64_t>(std::atoll(env)) : int64_t{64};
  }();
  return value;
}

template <typename S>
class ReducedStepGemm {
 public:
  ReducedStepGemm(const at::Tensor& w, int64_t calls, int64_t rows = 0) : K_(w.size(0)), N_(w.size(1)) {
    if (std::is_same_v<S, c10::BFloat16> && K_ % 2 == 0 && vnni_brgemm_usable()) {
      at::Tensor vnni = vnni_pack(w);  // [K/2, N, 2]
      // a weight that fits a core's L2 stays one brgemm: at batch 1 the per-call cost of 20 panels
      // (H=320) outweighed the gain
      const bool large = K_ * N_ * int64_t(sizeof(S)) > PANELS_FROM_BYTES;
      panel_ = large && bf16_panel() > 0 && bf16_panel() < N_ ? bf16_panel() : N_;
      if (panel_ == N_) {
        vnni_ = vnni;
      } else {  // [panels, K/2, panel, 2]
        vnni_ = column_panels(vnni, panel_);
      }
    } else {
      widened_.emplace(w.to(at::kFloat), calls, rows);
    }
  }
  ~ReducedStepGemm() {
    if (vnni_.defined()) at::native::cpublas::brgemm_release();  // AMX: the tile state of this thread
  }
  ReducedStepGemm(const ReducedStepGemm&) = delete;
  ReducedStepGemm& operator=(const ReducedStepGemm&) = delete;

  // c = a @ W; a: [n, K] in S with unit column stride, c: [n, N] fp32 with unit column stride
  void run(const at::Tensor& a, at::Tensor& c) const {
    if (!vnni_.defined()) {
      widened_->run(a.to(at::kFloat), c);
      return;
    }
    const auto* a_p = reinterpret_cast<const c10::BFloat16*>(a.data_ptr());
    const auto* w_p = reinterpret_cast<const c10::BFloat16*>(vnni_.data_ptr());
    float* c_p = reinterpret_cast<float*>(c.data_ptr());
    for (int64_t j = 0; j * panel_ < N_; ++j) {
      at::native::cpublas::brgemm(a.size(0), std::min(panel_, N_ - j * panel_), K_, a.stride(0), panel_, c.stride(0),
                                  /*add_C=*/false, a_p, w_p + j * K_ * panel_, c_p + j * panel_, /*is_vnni=*/true);
    }
  }

 private:
  int64_t K_, N_, panel_ = 0;
  at::Tensor vnni_;
  c10::optional<StepGemm<float>> widened_;
};

// The step GEMM for storage type S: its result is in Acc<S>.
template <typename S>
using StepGemmFor = std::conditional_t<is_reduced<S>, ReducedStepGemm<S>, StepGemm<S>>;

// The dtype the backward's gradient GEMMs multiply in: fp16 widened to fp32 (oneDNN has no fp16
// GEMM without AVX512-FP16), and bf16 too where this CPU has no bf16 dot product (no VNNI brgemm:
// ATen's bf16 fallback took 4.4 s for one [896, 2048] @ [2048, 512] on an AVX2 CPU).
inline at::ScalarType gradient_gemm_dtype(at::ScalarType dt) {
  if (dt == at::kHalf || (dt == at::kBFloat16 && !vnni_brgemm_usable())) return at::kFloat;
  return dt;
}

}  // namespace bilstm_native
