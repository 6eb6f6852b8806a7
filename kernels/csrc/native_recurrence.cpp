// Native CPU recurrence for one LSTM layer, all directions: the contract of kernels/vectorized.py.
//
// Schedule: one task per (direction, slice of batch rows); the tasks run concurrently in ONE
// at::parallel_for (one fork/join per call) and each sweeps all of its steps alone, so no thread
// waits for another inside the time loop. A step of a task is one GEMM through ATen
// (at::mm_out: MKL or whatever BLAS this torch has; inside a parallel region it runs on the
// calling thread) and one fused loop over the task's rows for the gate nonlinearities, the cell
// and hidden update and every store (forward), or the gate gradients and state-gradient update
// (backward).
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
#include <ATen/core/LegacyTypeDispatch.h>  // AutoDispatchBelowADInplaceOrView
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
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
    const S* __restrict__ gx, int64_t gx_rs,  // gx at (t, 0, d): row b at gx + b * gx_rs
    const S* __restrict__ hw,                 // [n, 4H]: h_prev @ W_hh^T of this step
    S* __restrict__ h,                        // [n, H] out: o * tanh(c) (the h state unless PROJ)
    S* __restrict__ c,                        // [n, H] cell state, updated in place
    S* __restrict__ out, int64_t rs,          // out at (t, 0, d), unused with PROJ; rs: row stride of out and cs
    S* __restrict__ gates,                    // SAVE: gates at (t, 0, d) (row stride gx_rs)
    S* __restrict__ cs) {                     // SAVE: cs at (t, 0, d) (row stride rs)
  const int64_t G = 4 * H;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t b = rows[r];
    const S* __restrict__ x = gx + b * gx_rs;
    const S* __restrict__ a = hw + r * G;
    S* __restrict__ hr = h + r * H;
    S* __restrict__ cr = c + r * H;
    S* __restrict__ o_row = PROJ ? nullptr : out + b * rs;
    S* __restrict__ g_row = SAVE ? gates + b * gx_rs : nullptr;
    S* __restrict__ c_row = SAVE ? cs + b * rs : nullptr;
    SIMD_LOOP
    for (int64_t j = 0; j < H; ++j) {
      S i = sigmoid(x[j] + a[j]);
      S f = sigmoid(x[H + j] + a[H + j]);
      S g = tanh_act(x[2 * H + j] + a[2 * H + j]);
      S o = sigmoid(x[3 * H + j] + a[3 * H + j]);
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
template <typename S, bool PROJ>
static ALWAYS_INLINE void backward_rows(
    int64_t n, const int64_t* rows, int64_t H,
    const S* __restrict__ dout, int64_t rs,         // dout at (t, 0, d), unused with PROJ; rs: row stride of dout and cs
    const S* __restrict__ gates, int64_t g_rs,      // saved activated gates at (t, 0, d)
    const S* __restrict__ cs,                       // saved cell state at (t, 0, d)
    const S* __restrict__ c_prev, int64_t cp_rs,    // previous cell state: cs at the previous step, or c0
    S* __restrict__ dh,                             // [n, H] in: dL/dh after this step; consumed
    S* __restrict__ dc,                             // [n, H] in/out: dL/dc after -> before this step
    S* __restrict__ dg,                             // [n, 4H] out: gate gradients for the GEMM
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
    S* __restrict__ dgr = dg + r * G;
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
      dgr[j] = di;
      dgr[H + j] = df;
      dgr[2 * H + j] = dgg;
      dgr[3 * H + j] = d_o;
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
static ALWAYS_INLINE void backward_rows_for(bool proj, Args... args) {
  proj ? backward_rows<S, true>(args...) : backward_rows<S, false>(args...);
}

// The multiversioned entry points (target_clones wants plain functions, not templates). Without
// gates (nullptr) the forward is the inference variant.
MULTI_TARGET void forward_rows_f32(int64_t n, const int64_t* rows, int64_t H, const float* gx, int64_t gx_rs,
                                   const float* hw, float* h, float* c, float* out, int64_t rs, float* gates,
                                   float* cs, bool proj) {
  forward_rows_for<float>(gates != nullptr, proj, n, rows, H, gx, gx_rs, hw, h, c, out, rs, gates, cs);
}
MULTI_TARGET void forward_rows_f64(int64_t n, const int64_t* rows, int64_t H, const double* gx, int64_t gx_rs,
                                   const double* hw, double* h, double* c, double* out, int64_t rs, double* gates,
                                   double* cs, bool proj) {
  forward_rows_for<double>(gates != nullptr, proj, n, rows, H, gx, gx_rs, hw, h, c, out, rs, gates, cs);
}
MULTI_TARGET void backward_rows_f32(int64_t n, const int64_t* rows, int64_t H, const float* dout, int64_t rs,
                                    const float* gates, int64_t g_rs, const float* cs, const float* c_prev,
                                    int64_t cp_rs, float* dh, float* dc, float* dg, float* dgates, bool proj) {
  backward_rows_for<float>(proj, n, rows, H, dout, rs, gates, g_rs, cs, c_prev, cp_rs, dh, dc, dg, dgates);
}
MULTI_TARGET void backward_rows_f64(int64_t n, const int64_t* rows, int64_t H, const double* dout, int64_t rs,
                                    const double* gates, int64_t g_rs, const double* cs, const double* c_prev,
                                    int64_t cp_rs, double* dh, double* dc, double* dg, double* dgates, bool proj) {
  backward_rows_for<double>(proj, n, rows, H, dout, rs, gates, g_rs, cs, c_prev, cp_rs, dh, dc, dg, dgates);
}

static void forward_rows_any(int64_t n, const int64_t* rows, int64_t H, const float* gx, int64_t gx_rs,
                             const float* hw, float* h, float* c, float* out, int64_t rs, float* gates, float* cs,
                             bool proj) {
  forward_rows_f32(n, rows, H, gx, gx_rs, hw, h, c, out, rs, gates, cs, proj);
}
static void forward_rows_any(int64_t n, const int64_t* rows, int64_t H, const double* gx, int64_t gx_rs,
                             const double* hw, double* h, double* c, double* out, int64_t rs, double* gates,
                             double* cs, bool proj) {
  forward_rows_f64(n, rows, H, gx, gx_rs, hw, h, c, out, rs, gates, cs, proj);
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
// Forward
//
// Projection (w_hr defined, [D, P, H]): the h state and out are P wide (P = H without one), and
// a step is two GEMMs: the fused loop leaves o * tanh(c) in a task-private [rows, H] buffer, and
// h = that @ W_hr^T goes into the h state, from which the running rows' out is copied.

template <typename S>
static void forward_impl(const at::Tensor& gx, const at::Tensor& w_hh, const at::Tensor& w_hr, const at::Tensor& h0,
                         const at::Tensor& c0, const std::vector<int64_t>& len, bool save, at::Tensor& out,
                         at::Tensor& h_n, at::Tensor& c_n, at::Tensor& gates, at::Tensor& cs) {
  const int64_t T = gx.size(0), B = gx.size(1), D = gx.size(2), G = gx.size(3), H = G / 4;
  const bool proj = w_hr.defined();
  const int64_t P = h0.size(2);
  const int64_t gx_rs = D * G, c_rs = D * H, out_rs = D * P;  // row (batch) strides
  const int64_t gx_ts = B * gx_rs, c_ts = B * c_rs, out_ts = B * out_rs;
  const S* gx_p = gx.data_ptr<S>();
  S* out_p = out.data_ptr<S>();
  S* gates_p = save ? gates.data_ptr<S>() : nullptr;
  S* cs_p = save ? cs.data_ptr<S>() : nullptr;
  const S* h0_p = h0.data_ptr<S>();
  const S* c0_p = c0.data_ptr<S>();
  S* hn_p = h_n.data_ptr<S>();
  S* cn_p = c_n.data_ptr<S>();
  // W_hh^T (and W_hr^T) as contiguous matrices: the GEMM runs faster on them than on the
  // transposed views (MKL, measured in benchmarks/NOTES.md), worth the copy unless the call is a
  // step or two.
  const bool copy_wt = T > 2;
  std::vector<Task> tasks = make_tasks(len, D);
  run_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t k) {
    const Task& task = tasks[k];
    const int64_t d = task.d, nr = static_cast<int64_t>(task.rows.size());
    const int64_t* rows = task.rows.data();
    at::Tensor wt = copy_wt ? w_hh[d].t().contiguous() : w_hh[d].t();  // [P, 4H]
    at::Tensor wrt;                                                        // [H, P]
    if (proj) wrt = copy_wt ? w_hr[d].t().contiguous() : w_hr[d].t();
    // task-private state, allocated on the thread that uses it: h [nr, P], c [nr, H],
    // hw [nr, 4H], and with a projection the unprojected h, u [nr, H]
    at::Tensor h = at::empty({nr, P}, gx.options());
    at::Tensor c = at::empty({nr, H}, gx.options());
    at::Tensor hw = at::empty({nr, G}, gx.options());
    at::Tensor u = proj ? at::empty({nr, H}, gx.options()) : h;
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
      if (n > 0) {
        at::Tensor hw_n = hw.narrow(0, 0, n);
        at::mm_out(hw_n, h.narrow(0, 0, n), wt);
        // the loop's out and cs share the row stride c_rs; with a projection it does not write out
        forward_rows_any(n, rows, H, gx_p + t * gx_ts + d * G, gx_rs, hw.data_ptr<S>(), u.data_ptr<S>(), c_p,
                         proj ? nullptr : out_t, c_rs, save ? gates_p + t * gx_ts + d * G : nullptr,
                         save ? cs_p + t * c_ts + d * H : nullptr, proj);
        if (proj) {
          at::Tensor h_rows = h.narrow(0, 0, n);
          at::mm_out(h_rows, u.narrow(0, 0, n), wrt);
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

std::vector<at::Tensor> recurrence_forward(const at::Tensor& gx_in, const at::Tensor& w_hh_in, const at::Tensor& h0_in,
                                           const at::Tensor& c0_in, const c10::optional<at::Tensor>& lengths,
                                           bool save, const c10::optional<at::Tensor>& w_hr_in) {
  check_inputs(gx_in, w_hh_in, w_hr_in);
  const auto opts = gx_in.options();
  at::Tensor gx = gx_in.contiguous();
  at::Tensor w_hh = w_hh_in.to(opts.dtype()).contiguous();
  at::Tensor w_hr = projection_weight(w_hr_in, gx.scalar_type());
  at::Tensor h0 = h0_in.to(opts.dtype()).contiguous();
  at::Tensor c0 = c0_in.to(opts.dtype()).contiguous();
  const int64_t T = gx.size(0), B = gx.size(1), D = gx.size(2), G = gx.size(3), H = G / 4, P = w_hh.size(2);
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
    if (gx.scalar_type() == at::kFloat)
      forward_impl<float>(gx, w_hh, w_hr, h0, c0, len, save, out, h_n, c_n, gates, cs);
    else
      forward_impl<double>(gx, w_hh, w_hr, h0, c0, len, save, out, h_n, c_n, gates, cs);
  } else {
    h_n.copy_(h0);
    c_n.copy_(c0);
  }
  return {out, h_n, c_n, gates, cs};
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
    at::Tensor w = w_hh[d];  // [4H, P]: dh_prev = dgates @ W_hh
    at::Tensor dh = at::empty({nr, P}, gates.options());
    at::Tensor dc = at::empty({nr, H}, gates.options());
    at::Tensor dg = at::empty({nr, G}, gates.options());
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
          at::mm_out(du_rows, dh.narrow(0, 0, n), w_hr[d]);
        }
        // the loop's dout and cs share the row stride c_rs; with a projection it does not read dout
        backward_rows_any(n, rows, H, proj ? nullptr : dout_t, c_rs, gates_p + t * g_ts + d * G, g_rs,
                          cs_p + t * c_ts + d * H, c_prev, cp_rs, du.data_ptr<S>(), dc_p, dg.data_ptr<S>(),
                          dgates_p + t * g_ts + d * G, proj);
        at::Tensor dh_rows = dh.narrow(0, 0, n);
        at::mm_out(dh_rows, dg.narrow(0, 0, n), w);
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
  m.def("simd_level", &simd_level, "the instruction-set level the fused loops run at on this CPU");
  m.def("openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "whether the extension was compiled with OpenMP (without it at::parallel_for runs serially)");
}
