// Native CPU recurrence for one LSTM layer, all directions: the contract of kernels/vectorized.py.
//
// Schedule: one task per (direction, slice of batch rows); the tasks run concurrently in ONE
// at::parallel_for (one fork/join per call) and each sweeps all of its steps alone, so no thread
// waits for another inside the time loop. A step of a task is one GEMM through ATen (cpublas's
// brgemm on weights packed once per call, or at::mm_out; inside a parallel region either runs on
// the calling thread; see StepGemm) and one fused loop over the task's rows for the gate
// nonlinearities, the cell and hidden update and every store (forward), or the gate gradients
// and state-gradient update (backward). layer_forward also has each task project its own input,
// a block of steps at a time, and layer_gradients runs the backward's GEMMs after the recurrence
// as tasks too.
// With a projection (nn.LSTM's proj_size) a step has one more GEMM each way: see Forward, Backward.
//
// Lengths: each task keeps its rows sorted by length, longest first, in private contiguous state
// buffers, so the rows still running at step t are a prefix and the GEMM covers exactly them.
// Rows past their end are never computed; their outputs are written as the contract says.
//
// SIMD: the fused loops are compiled for several instruction sets with GCC function
// multiversioning (target_clones); the loader picks the best one this CPU supports at run time,
// so the extension never executes an instruction the CPU lacks.
// Only the ATen pieces used here, not <torch/extension.h> (the whole C++ frontend): the build
// takes a fraction of the time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/core/LegacyTypeDispatch.h>  // AutoDispatchBelowADInplaceOrView
#include <ATen/native/CPUBlas.h>             // cpublas::brgemm
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(BILSTM_NO_CLONES)
#define MULTI_TARGET __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTI_TARGET
#endif
#define ALWAYS_INLINE inline __attribute__((always_inline))
// The loops below read and write through many row pointers that never overlap; without this the
// compiler gives up on vectorizing them (too many run-time alias checks) and runs them scalar.
#define SIMD_LOOP _Pragma("omp simd")

namespace {

// ---------------------------------------------------------------------------------------------
// Activations. fp32: branch-free forms that the compiler vectorizes; NaN propagates (every clamp
// is a comparison-select that lets NaN through), +-inf saturate as in torch.

static ALWAYS_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
static ALWAYS_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// exp(x): Cephes' expf (range reduction by ln 2, degree-5 polynomial), within ~1 ulp.
static ALWAYS_INLINE float exp_f32(float x) {
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

static ALWAYS_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

// tanh(x): Cephes' tanhf, within 1.3 ulp: an odd polynomial below |x| = 0.625, 1 - 2/(e^2|x| + 1)
// above, then the sign. Near saturation the backward's 1 - tanh^2 cancels, so an ulp of tanh
// there is a large relative error of a gradient: the rational approximation used before (Eigen,
// MLAS) was up to 4.6 ulp off and put a weight gradient 1.4e-6 from nn.LSTM's (conformance s26).
static ALWAYS_INLINE float tanh_act(float x) {
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
static ALWAYS_INLINE double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
static ALWAYS_INLINE double tanh_act(double x) { return std::tanh(x); }

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

static void forward_rows_any(int64_t n, const int64_t* rows, int64_t H, const float* gx, const int64_t* gx_rows,
                             int64_t gx_rs, const float* bias, const float* hw, float* h, float* c, float* out,
                             int64_t rs, float* gates, int64_t g_rs, float* cs, bool proj) {
  forward_rows_f32(n, rows, H, gx, gx_rows, gx_rs, bias, hw, h, c, out, rs, gates, g_rs, cs, proj);
}
static void forward_rows_any(int64_t n, const int64_t* rows, int64_t H, const double* gx, const int64_t* gx_rows,
                             int64_t gx_rs, const double* bias, const double* hw, double* h, double* c,
                             double* out, int64_t rs, double* gates, int64_t g_rs, double* cs, bool proj) {
  forward_rows_f64(n, rows, H, gx, gx_rows, gx_rs, bias, hw, h, c, out, rs, gates, g_rs, cs, proj);
}
static void backward_rows_any(int64_t n, const int64_t* rows, int64_t H, const float* dout, int64_t rs,
                              const float* gates, int64_t g_rs, const float* cs, const float* c_prev, int64_t cp_rs,
                              float* dh, float* dc, float* dg, float* dgates, bool proj) {
  backward_rows_f32(n, rows, H, dout, rs, gates, g_rs, cs, c_prev, cp_rs, dh, dc, dg, dgates, proj);
}
static void backward_rows_any(int64_t n, const int64_t* rows, int64_t H, const double* dout, int64_t rs,
                              const double* gates, int64_t g_rs, const double* cs, const double* c_prev,
                              int64_t cp_rs, double* dh, double* dc, double* dg, double* dgates, bool proj) {
  backward_rows_f64(n, rows, H, dout, rs, gates, g_rs, cs, c_prev, cp_rs, dh, dc, dg, dgates, proj);
}

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

// ---------------------------------------------------------------------------------------------
// Work split.

struct Task {
  int64_t d;                  // direction: 0 runs t = 0..T-1, 1 runs t = T-1..0
  std::vector<int64_t> rows;  // batch rows, longest sequence first

  // Row r is batch row r: the task's rows of a [T, B, ...] tensor at one step are then a strided
  // matrix as they lie, read without a gather.
  bool in_batch_order() const {
    for (size_t r = 0; r < rows.size(); ++r)
      if (rows[r] != static_cast<int64_t>(r)) return false;
    return true;
  }
};

// Rows per batch slice below which splitting a direction further does not pay (each slice's
// GEMM reads all of W_hh for fewer rows). A first guess, not yet measured on a quiet machine:
// BILSTM_FAST_NATIVE_MIN_ROWS overrides it (a huge value: never split, one task per direction).
static int64_t min_rows_per_slice() {
  static const int64_t value = [] {
    const char* env = std::getenv("BILSTM_FAST_NATIVE_MIN_ROWS");
    const long long parsed = env != nullptr ? std::atoll(env) : 0;
    return parsed > 0 ? static_cast<int64_t>(parsed) : int64_t{8};
  }();
  return value;
}

static std::vector<int64_t> lengths_vector(const c10::optional<at::Tensor>& lengths, int64_t B, int64_t T) {
  std::vector<int64_t> len(B, T);
  if (lengths.has_value() && lengths->defined()) {
    at::Tensor l = lengths->to(at::kCPU, at::kLong).contiguous();
    TORCH_CHECK(l.numel() == B, "lengths must have B entries");
    const int64_t* p = l.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(p[b] >= 1 && p[b] <= T, "lengths must lie in [1, T]");
      len[b] = p[b];
    }
  }
  return len;
}

// One task per (direction, batch slice). The slices deal the length-sorted rows round-robin,
// so every slice stays sorted and gets a fair share of long and short sequences.
static std::vector<Task> make_tasks(const std::vector<int64_t>& len, int64_t D) {
  const int64_t B = static_cast<int64_t>(len.size());
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return len[a] > len[b]; });
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t slices = std::max<int64_t>(1, threads / D);
  slices = std::min<int64_t>(slices, std::max<int64_t>(1, B / min_rows_per_slice()));
  std::vector<Task> tasks;
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t k = 0; k < slices; ++k) {
      Task task{d, {}};
      for (int64_t r = k; r < B; r += slices) task.rows.push_back(order[r]);
      if (!task.rows.empty()) tasks.push_back(std::move(task));
    }
  }
  return tasks;
}

// Rows of a task still running at time t: a prefix, since the rows are sorted by length.
static int64_t active_rows(const Task& task, const std::vector<int64_t>& len, int64_t t, int64_t n_prev) {
  int64_t n = n_prev;
  while (n > 0 && len[task.rows[n - 1]] <= t) --n;
  while (n < static_cast<int64_t>(task.rows.size()) && len[task.rows[n]] > t) ++n;
  return n;
}

template <typename Fn>
static void run_tasks(int64_t n_tasks, const Fn& fn) {
  // One fork/join for the whole call. Below autograd: the ATen calls inside are plain kernels.
  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t k = begin; k < end; ++k) fn(k);
  });
}

// ---------------------------------------------------------------------------------------------
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
constexpr int64_t PACK_MIN = int64_t{1} << 18;  // 1 MB of fp32: H = 256
constexpr int64_t PACK_MIN_ROWS = 2;
constexpr int64_t PACK_MAX_ROWS = 128;

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
    const int64_t panels = (N_ + PANEL - 1) / PANEL;
    // [panels, K, PANEL]; the last panel's columns past N stay zero and are never read back
    w_ = at::zeros({panels, K_, PANEL}, w.options());
    for (int64_t j = 0; j < panels; ++j) {
      const int64_t width = std::min(PANEL, N_ - j * PANEL);
      w_[j].narrow(1, 0, width).copy_(w.narrow(1, j * PANEL, width));
    }
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
// Forward

// ---------------------------------------------------------------------------------------------
// Forward
//
// Projection (w_hr defined, [D, P, H]): the h state and out are P wide (P = H without one), and
// a step is two GEMMs: the fused loop leaves o * tanh(c) in a task-private [rows, H] buffer, and
// h = that @ W_hr^T goes into the h state, from which the running rows' out is copied.

// Where a task's input projections x @ W_ih^T + b come from: the contract's precomputed gx
// [T, B, D, 4H] (recurrence_forward), or x [T, B, I], W_ih [D, 4H, I] and the summed bias
// [D, 4H] (undefined without bias), projected by the task itself a block of steps at a time
// (layer_forward; the fused loop adds the bias, which saves a pass over the block). Each block
// is consumed while it is still in the core's cache, the projection runs on the direction's own
// thread with no fork/join of its own, and the whole gx (fresh memory that faults page by page as
// it is first written) is never made.
struct Projections {
  at::Tensor gx;
  at::Tensor x, w_ih, bias;
};

// Bytes of projections per block. Large enough that the W_ih GEMM has hundreds of rows and
// streams W_ih only T / steps times; small enough to stay in the last-level cache between its
// projection and its steps, and under glibc's largest mmap threshold (32 MB), so after the first
// call the block is recycled heap memory instead of fresh pages that fault on first touch.
constexpr int64_t BLOCK_BYTES = int64_t{4} << 20;

// The projections of one task, a block of steps at a time (layer_forward's source).
template <typename S>
class ProjectionBlocks {
 public:
  ProjectionBlocks(const Projections& p, const Task& task, const std::vector<int64_t>& len, int64_t T)
      : task_(task), len_(len), T_(T), B_(p.x.size(1)), I_(p.x.size(2)), G_(p.w_ih.size(1)),
        nr_(static_cast<int64_t>(task.rows.size())),
        steps_(std::max<int64_t>(1, std::min<int64_t>(T, BLOCK_BYTES / (nr_ * G_ * int64_t(sizeof(S)))))),
        gemm_(p.w_ih[task.d].t(), (T + steps_ - 1) / steps_), x_(p.x),
        block_(at::empty({steps_ * nr_, G_}, p.x.options())), order_(nr_) {
    std::iota(order_.begin(), order_.end(), int64_t{0});
    contiguous_rows_ = nr_ == B_ && task.in_batch_order();
  }

  // Row r's projections at step s (time t) are at base + index()[r] * G.
  const S* base(int64_t s, int64_t t) {
    if (s % steps_ == 0) project(s);
    return block_.data_ptr<S>() + (t - t_lo_) * rows_ * G_;
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
  const int64_t T_, B_, I_, G_, nr_, steps_;
  const StepGemm<S> gemm_;
  at::Tensor x_, block_, gathered_;
  std::vector<int64_t> order_;
  bool contiguous_rows_;
  int64_t t_lo_ = 0, rows_ = 0;
};

template <typename S>
static void forward_impl(const Projections& input, const at::Tensor& w_hh, const at::Tensor& w_hr, const at::Tensor& h0,
                         const at::Tensor& c0, const std::vector<int64_t>& len, bool save, at::Tensor& out,
                         at::Tensor& h_n, at::Tensor& c_n, at::Tensor& gates, at::Tensor& cs) {
  const int64_t T = out.size(0), B = out.size(1), D = out.size(2), H = c0.size(2), G = 4 * H;
  const bool proj = w_hr.defined();
  const int64_t P = h0.size(2);
  const int64_t gx_rs = D * G, c_rs = D * H, out_rs = D * P;  // row (batch) strides of gx and gates, cs, out
  const int64_t gx_ts = B * gx_rs, c_ts = B * c_rs, out_ts = B * out_rs;
  const bool fused = !input.gx.defined();
  const S* gx_p = fused ? nullptr : input.gx.data_ptr<S>();
  S* out_p = out.data_ptr<S>();
  S* gates_p = save ? gates.data_ptr<S>() : nullptr;
  S* cs_p = save ? cs.data_ptr<S>() : nullptr;
  const S* h0_p = h0.data_ptr<S>();
  const S* c0_p = c0.data_ptr<S>();
  S* hn_p = h_n.data_ptr<S>();
  S* cn_p = c_n.data_ptr<S>();
  std::vector<Task> tasks = make_tasks(len, D);
  run_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t k) {
    const Task& task = tasks[k];
    const int64_t d = task.d, nr = static_cast<int64_t>(task.rows.size());
    const int64_t* rows = task.rows.data();
    const StepGemm<S> recurrent(w_hh[d].t(), T, nr);  // h_prev @ W_hh^T
    c10::optional<StepGemm<S>> projection;                                        // u @ W_hr^T
    if (proj) projection.emplace(w_hr[d].t(), T);
    c10::optional<ProjectionBlocks<S>> blocks;
    if (fused) blocks.emplace(input, task, len, T);
    // the fused loop adds the bias to a block's projections; gx holds it already
    const at::Tensor bias = fused && input.bias.defined() ? input.bias[d].contiguous() : at::zeros({G}, out.options());
    // task-private state, allocated on the thread that uses it: h [nr, P], c [nr, H],
    // hw [nr, 4H], and with a projection the unprojected h, u [nr, H]
    at::Tensor h = at::empty({nr, P}, out.options());
    at::Tensor c = at::empty({nr, H}, out.options());
    at::Tensor hw = at::empty({nr, G}, out.options());
    at::Tensor u = proj ? at::empty({nr, H}, out.options()) : h;
    S* h_p = h.data_ptr<S>();
    S* c_p = c.data_ptr<S>();
    for (int64_t r = 0; r < nr; ++r) {
      std::memcpy(h_p + r * P, h0_p + (d * B + rows[r]) * P, P * sizeof(S));
      std::memcpy(c_p + r * H, c0_p + (d * B + rows[r]) * H, H * sizeof(S));
    }
    int64_t n = nr;
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = d == 0 ? s : T - 1 - s;
      n = active_rows(task, len, t, n);
      S* out_t = out_p + t * out_ts + d * P;
      const S* gx_t = fused ? blocks->base(s, t) : gx_p + t * gx_ts + d * G;
      if (n > 0) {
        at::Tensor hw_n = hw.narrow(0, 0, n);
        recurrent.run(h.narrow(0, 0, n), hw_n);
        // the loop's out and cs share the row stride c_rs; with a projection it does not write out
        forward_rows_any(n, rows, H, gx_t, fused ? blocks->index() : rows, fused ? blocks->row_stride() : gx_rs,
                         bias.data_ptr<S>(), hw.data_ptr<S>(), u.data_ptr<S>(), c_p, proj ? nullptr : out_t, c_rs,
                         save ? gates_p + t * gx_ts + d * G : nullptr, gx_rs, save ? cs_p + t * c_ts + d * H : nullptr,
                         proj);
        if (proj) {
          at::Tensor h_rows = h.narrow(0, 0, n);
          projection->run(u.narrow(0, 0, n), h_rows);
          for (int64_t r = 0; r < n; ++r) std::memcpy(out_t + rows[r] * out_rs, h_p + r * P, P * sizeof(S));
        }
      }
      // rows past their end (t >= len): zero output; the saved cell state carries the state
      // (the final one going forward, c0 going back); the gates are never read there
      for (int64_t r = n; r < nr; ++r) {
        const int64_t b = rows[r];
        std::memset(out_t + b * out_rs, 0, P * sizeof(S));
        if (save) {
          std::memcpy(cs_p + t * c_ts + b * c_rs + d * H, c_p + r * H, H * sizeof(S));
          std::memset(gates_p + t * gx_ts + b * gx_rs + d * G, 0, G * sizeof(S));
        }
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      std::memcpy(hn_p + (d * B + rows[r]) * P, h_p + r * P, P * sizeof(S));
      std::memcpy(cn_p + (d * B + rows[r]) * H, c_p + r * H, H * sizeof(S));
    }
  });
}

// gx [T, B, D, 4H]; w_hh [D, 4H, P] with P = H, or with a projection w_hr [D, P, H].
static void check_inputs(const at::Tensor& gx, const at::Tensor& w_hh, const c10::optional<at::Tensor>& w_hr) {
  TORCH_CHECK(gx.device().is_cpu(), "native recurrence: CPU tensors only");
  TORCH_CHECK(gx.dim() == 4 && gx.size(3) % 4 == 0, "native recurrence: gx must be [T, B, D, 4H]");
  TORCH_CHECK(gx.scalar_type() == at::kFloat || gx.scalar_type() == at::kDouble,
              "native recurrence: float32 or float64 only");
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
static at::Tensor projection_weight(const c10::optional<at::Tensor>& w_hr, const at::ScalarType dtype) {
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
  at::Tensor c0 = c0_in.to(dt).contiguous();
  const int64_t G = 4 * H, P = w_hh.size(2);
  TORCH_CHECK(h0.sizes() == at::IntArrayRef({D, B, P}) && c0.sizes() == at::IntArrayRef({D, B, H}),
              "native recurrence: h0 must be [D, B, P] and c0 [D, B, H]");
  at::Tensor out = at::empty({T, B, D, P}, opts);
  at::Tensor h_n = at::empty({D, B, P}, opts);
  at::Tensor c_n = at::empty({D, B, H}, opts);
  at::Tensor gates, cs;
  if (save) {
    gates = at::empty({T, B, D, G}, opts);
    cs = at::empty({T, B, D, H}, opts);
  }
  if (T > 0 && B > 0 && H > 0) {
    const std::vector<int64_t> len = lengths_vector(lengths, B, T);
    if (dt == at::kFloat)
      forward_impl<float>(input, w_hh, w_hr, h0, c0, len, save, out, h_n, c_n, gates, cs);
    else
      forward_impl<double>(input, w_hh, w_hr, h0, c0, len, save, out, h_n, c_n, gates, cs);
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
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "native layer_forward: float32 or float64 only");
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
    input.bias = bias->to(dt).contiguous();
  }
  return forward_sweep(input, w_hh, c10::nullopt, h0, c0, lengths, save, x.size(0), x.size(1), D, H, x.options());
}

// ---------------------------------------------------------------------------------------------
// Backward
//
// Projection: the carried dh is P wide. A step adds dout to it (and saves that, the returned dh),
// takes it back through the projection (one GEMM, dh @ W_hr, into a [rows, H] buffer) and runs the
// fused loop on the result; dh = dgates @ W_hh then gives the previous step's P-wide dh as before.

template <typename S>
static void backward_impl(const at::Tensor& dout, const at::Tensor& dh_n, const at::Tensor& dc_n,
                          const at::Tensor& w_hh, const at::Tensor& w_hr, const at::Tensor& gates,
                          const at::Tensor& cs, const at::Tensor& c0, const std::vector<int64_t>& len,
                          at::Tensor& dgates, at::Tensor& dh0, at::Tensor& dc0, at::Tensor& dhs) {
  const int64_t T = gates.size(0), B = gates.size(1), D = gates.size(2), G = gates.size(3), H = G / 4;
  const bool proj = w_hr.defined();
  const int64_t P = dh_n.size(2);
  const int64_t g_rs = D * G, c_rs = D * H, h_rs = D * P;  // row strides: gates, cs, dout (and dhs)
  const int64_t g_ts = B * g_rs, c_ts = B * c_rs, h_ts = B * h_rs;
  const S* dout_p = dout.data_ptr<S>();
  const S* gates_p = gates.data_ptr<S>();
  const S* cs_p = cs.data_ptr<S>();
  const S* c0_p = c0.data_ptr<S>();
  const S* dhn_p = dh_n.data_ptr<S>();
  const S* dcn_p = dc_n.data_ptr<S>();
  S* dgates_p = dgates.data_ptr<S>();
  S* dh0_p = dh0.data_ptr<S>();
  S* dc0_p = dc0.data_ptr<S>();
  S* dhs_p = proj ? dhs.data_ptr<S>() : nullptr;
  std::vector<Task> tasks = make_tasks(len, D);
  run_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t k) {
    const Task& task = tasks[k];
    const int64_t d = task.d, nr = static_cast<int64_t>(task.rows.size());
    const int64_t* rows = task.rows.data();
    const StepGemm<S> recurrent(w_hh[d], T, nr);  // dh_prev = dgates @ W_hh [4H, P]
    c10::optional<StepGemm<S>> projection;    // du = dh @ W_hr [P, H]
    if (proj) projection.emplace(w_hr[d], T);
    at::Tensor dh = at::empty({nr, P}, gates.options());
    at::Tensor dc = at::empty({nr, H}, gates.options());
    // rows in batch order: the step GEMM reads the gate gradients from dgates itself (row stride
    // D * 4H), else from a copy the loop also stores in task order
    const bool in_order = task.in_batch_order();
    at::Tensor dg = in_order ? at::Tensor() : at::empty({nr, G}, gates.options());
    // with a projection, the gradient of o * tanh(c): du = dh @ W_hr [nr, H]
    at::Tensor du = proj ? at::empty({nr, H}, gates.options()) : dh;
    S* dh_p = dh.data_ptr<S>();
    S* dc_p = dc.data_ptr<S>();
    for (int64_t r = 0; r < nr; ++r) {
      std::memcpy(dh_p + r * P, dhn_p + (d * B + rows[r]) * P, P * sizeof(S));
      std::memcpy(dc_p + r * H, dcn_p + (d * B + rows[r]) * H, H * sizeof(S));
    }
    int64_t n = 0;
    for (int64_t s = T - 1; s >= 0; --s) {  // the forward's steps, last first
      const int64_t t = d == 0 ? s : T - 1 - s;
      n = active_rows(task, len, t, n);
      if (n > 0) {
        const S* c_prev;
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
        if (proj) {
          add_dout(n, rows, P, dout_t, h_rs, dh_p, dhs_p + t * h_ts + d * P);
          at::Tensor du_rows = du.narrow(0, 0, n);
          projection->run(dh.narrow(0, 0, n), du_rows);
        }
        // the loop's dout and cs share the row stride c_rs; with a projection it does not read dout
        backward_rows_any(n, rows, H, proj ? nullptr : dout_t, c_rs, gates_p + t * g_ts + d * G, g_rs,
                          cs_p + t * c_ts + d * H, c_prev, cp_rs, du.data_ptr<S>(), dc_p,
                          in_order ? nullptr : dg.data_ptr<S>(), dgates_p + t * g_ts + d * G, proj);
        at::Tensor dh_rows = dh.narrow(0, 0, n);
        recurrent.run(in_order ? dgates[t].select(1, d).narrow(0, 0, n) : dg.narrow(0, 0, n), dh_rows);
      }
      // rows past their end: no gate gradient (nor dh); the state gradients pass through untouched
      for (int64_t r = n; r < nr; ++r) {
        std::memset(dgates_p + t * g_ts + rows[r] * g_rs + d * G, 0, G * sizeof(S));
        if (proj) std::memset(dhs_p + t * h_ts + rows[r] * h_rs + d * P, 0, P * sizeof(S));
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      std::memcpy(dh0_p + (d * B + rows[r]) * P, dh_p + r * P, P * sizeof(S));
      std::memcpy(dc0_p + (d * B + rows[r]) * H, dc_p + r * H, H * sizeof(S));
    }
  });
}

// -> dgates, dh0, dc0, and with a projection dh [T, B, D, P].
std::vector<at::Tensor> recurrence_backward(const at::Tensor& dout_in, const at::Tensor& dh_n_in,
                                            const at::Tensor& dc_n_in, const at::Tensor& w_hh_in,
                                            const at::Tensor& gates_in, const at::Tensor& cs_in,
                                            const at::Tensor& c0_in, const c10::optional<at::Tensor>& lengths,
                                            const c10::optional<at::Tensor>& w_hr_in) {
  check_inputs(gates_in, w_hh_in, w_hr_in);
  const auto opts = gates_in.options();
  const auto dt = opts.dtype();
  at::Tensor gates = gates_in.contiguous();
  at::Tensor cs = cs_in.to(dt).contiguous();
  at::Tensor dout = dout_in.to(dt).contiguous();
  at::Tensor dh_n = dh_n_in.to(dt).contiguous();
  at::Tensor dc_n = dc_n_in.to(dt).contiguous();
  at::Tensor w_hh = w_hh_in.to(dt).contiguous();
  at::Tensor w_hr = projection_weight(w_hr_in, gates.scalar_type());
  at::Tensor c0 = c0_in.to(dt).contiguous();
  const int64_t T = gates.size(0), B = gates.size(1), D = gates.size(2), G = gates.size(3), H = G / 4;
  const int64_t P = w_hh.size(2);
  TORCH_CHECK(dout.sizes() == at::IntArrayRef({T, B, D, P}) && dh_n.sizes() == at::IntArrayRef({D, B, P}) &&
                  dc_n.sizes() == at::IntArrayRef({D, B, H}),
              "native recurrence: dout must be [T, B, D, P], dh_n [D, B, P] and dc_n [D, B, H]");
  at::Tensor dgates = at::empty({T, B, D, G}, opts);
  at::Tensor dh0 = at::empty({D, B, P}, opts);
  at::Tensor dc0 = at::empty({D, B, H}, opts);
  at::Tensor dhs = w_hr.defined() ? at::empty({T, B, D, P}, opts) : at::Tensor();
  if (T > 0 && B > 0 && H > 0) {
    const std::vector<int64_t> len = lengths_vector(lengths, B, T);
    if (gates.scalar_type() == at::kFloat)
      backward_impl<float>(dout, dh_n, dc_n, w_hh, w_hr, gates, cs, c0, len, dgates, dh0, dc0, dhs);
    else
      backward_impl<double>(dout, dh_n, dc_n, w_hh, w_hr, gates, cs, c0, len, dgates, dh0, dc0, dhs);
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

static at::Tensor sum_over_rows(const at::Tensor& a, const at::Tensor& b) {  // a.t() @ b, a [n, M], b [n, N]
  const int64_t n = a.size(0);
  at::Tensor out = at::mm(a.narrow(0, 0, std::min(n, ROW_BLOCK)).t(), b.narrow(0, 0, std::min(n, ROW_BLOCK)));
  for (int64_t start = ROW_BLOCK; start < n; start += ROW_BLOCK) {
    const int64_t rows = std::min(ROW_BLOCK, n - start);
    out.add_(at::mm(a.narrow(0, start, rows).t(), b.narrow(0, start, rows)));
  }
  return out;
}

// dx = dgates @ W_ih (both directions: K = D*4H) and, per direction d, dW_ih[d] = dgates_d^T x,
// dW_hh[d] = dgates_d^T h_prev_d and db[d] = the column sums of dgates_d, each a fresh tensor,
// undefined where its need flag is false. The GEMMs run as single-threaded tasks in one
// fork/join instead of one 2-thread team per GEMM (whose split of a GEMM costs efficiency, and
// which waits on a busy core at every GEMM). Task (d, s) takes slice s of direction d's rows for
// its weight gradients (slices = threads / directions, at least one; whole ROW_BLOCKs, so the
// partial sums are sums of the same blocks) and one slice of dx's rows, so with one direction
// and two threads each thread gets half of each GEMM: dgates [T, B, D, 4H], x [T, B, I], h_prev
// [T, B, D, H] (undefined when no W_hh gradient is needed), w_ih [D, 4H, I]. Returns
// [dx, then dW_ih, dW_hh, db per direction].
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
  const auto dt = dgates_in.scalar_type();
  at::Tensor dgates = dgates_in.contiguous();
  at::Tensor x = x_in.to(dt).contiguous().view({n, I});
  at::Tensor h_prev = h_prev_in.has_value() && h_prev_in->defined() ? h_prev_in->to(dt).contiguous() : at::Tensor();
  at::Tensor w_ih = w_ih_in.to(dt).contiguous();
  const int64_t blocks = (n + ROW_BLOCK - 1) / ROW_BLOCK;
  const int64_t slices = std::max<int64_t>(1, std::min(at::get_num_threads() / D, blocks));
  const auto slice_rows = [&](int64_t s) {  // [first, end) of slice s: whole blocks
    return std::make_pair(std::min(n, blocks * s / slices * ROW_BLOCK), std::min(n, blocks * (s + 1) / slices * ROW_BLOCK));
  };
  // partial[k] for task k = d * slices + s: that slice's dW_ih, dW_hh, db of direction d
  std::vector<std::array<at::Tensor, 3>> partial(D * slices);
  at::Tensor dx;
  if (need_dx) dx = at::empty({T, B, I}, dgates.options());
  at::parallel_for(0, D * slices, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t d = k / slices;
      if (need_dx) {  // the k-th of D * slices slices of dx's rows
        const int64_t first = n * k / (D * slices), rows = n * (k + 1) / (D * slices) - first;
        at::Tensor dx_rows = dx.view({n, I}).narrow(0, first, rows);
        at::mm_out(dx_rows, dgates.view({n, D * G}).narrow(0, first, rows), w_ih.view({D * G, I}));
      }
      const auto [first, last] = slice_rows(k % slices);
      // a strided view: row stride D*4H
      at::Tensor dg = dgates.select(2, d).reshape({n, G}).narrow(0, first, last - first);
      if (need_w_ih[d]) partial[k][0] = sum_over_rows(dg, x.narrow(0, first, last - first));
      if (need_w_hh[d]) {
        TORCH_CHECK(h_prev.defined(), "native layer_gradients: h_prev is needed for W_hh's gradient");
        partial[k][1] = sum_over_rows(dg, h_prev.select(2, d).reshape({n, h_prev.size(3)}).narrow(0, first, last - first));
      }
      if (need_bias[d]) partial[k][2] = at::sum(dg, {0});
    }
  });
  std::vector<at::Tensor> result(1 + 3 * D);
  result[0] = dx;
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t j = 0; j < 3; ++j) {
      at::Tensor total = partial[d * slices][j];
      for (int64_t s = 1; s < slices && total.defined(); ++s) total.add_(partial[d * slices + s][j]);
      result[1 + 3 * d + j] = total;
    }
  }
  return result;
}

// Which clone of the fused loops the loader picked on this CPU (for the benchmark's machine line).
std::string simd_level() {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(BILSTM_NO_CLONES)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2+FMA)";
  return "x86-64 baseline";
#else
  return "compiler default";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bilstm_fast native CPU recurrence (see kernels/native.py)";
  m.def("recurrence_forward", &recurrence_forward, "forward sweep of one layer, all directions",
        py::arg("gx"), py::arg("w_hh"), py::arg("h0"), py::arg("c0"), py::arg("lengths"), py::arg("save"),
        py::arg("w_hr") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("recurrence_backward", &recurrence_backward, "backward sweep of one layer, all directions",
        py::arg("dout"), py::arg("dh_n"), py::arg("dc_n"), py::arg("w_hh"), py::arg("gates"), py::arg("cs"),
        py::arg("c0"), py::arg("lengths"), py::arg("w_hr") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("layer_forward", &layer_forward, "forward sweep of one layer from its input, the projection included",
        py::arg("x"), py::arg("w_ih"), py::arg("bias"), py::arg("w_hh"), py::arg("h0"), py::arg("c0"),
        py::arg("lengths"), py::arg("save"), py::call_guard<py::gil_scoped_release>());
  m.def("layer_gradients", &layer_gradients, "the backward's input, weight and bias gradients after the recurrence",
        py::arg("dgates"), py::arg("x"), py::arg("h_prev"), py::arg("w_ih"), py::arg("need_dx"), py::arg("need_w_ih"),
        py::arg("need_w_hh"), py::arg("need_bias"), py::call_guard<py::gil_scoped_release>());
  m.def("simd_level", &simd_level, "the instruction-set level the fused loops run at on this CPU");
  m.def("openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "whether the extension was compiled with OpenMP (without it at::parallel_for runs serially)");
}
