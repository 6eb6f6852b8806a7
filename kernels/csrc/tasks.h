// The work split: one task per (direction, slice of batch rows), run in one fork/join per call.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>  // AutoDispatchBelowADInplaceOrView

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <numeric>
#include <vector>

namespace bilstm_native {

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

// A positive integer from the environment variable `name`, else `fallback` (unset, not a number, or <= 0).
inline int64_t positive_env(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  const long long parsed = env != nullptr ? std::atoll(env) : 0;
  return parsed > 0 ? static_cast<int64_t>(parsed) : fallback;
}

// Rows per batch slice below which splitting a direction further does not pay (each slice's
// GEMM reads all of W_hh for fewer rows). A first guess, not yet measured on a quiet machine:
// BILSTM_FAST_NATIVE_MIN_ROWS overrides it (a huge value: never split, one task per direction).
inline int64_t min_rows_per_slice() {
  static const int64_t value = positive_env("BILSTM_FAST_NATIVE_MIN_ROWS", 8);
  return value;
}

inline std::vector<int64_t> lengths_vector(const c10::optional<at::Tensor>& lengths, int64_t B, int64_t T) {
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

// One task per (direction, batch slice): at most max_slices slices per direction (0: the threads
// shared among the directions), fewer where a slice would get under min_rows_per_slice() rows. The
// slices deal the length-sorted rows round-robin, so every slice stays sorted and gets a fair
// share of long and short sequences.
inline std::vector<Task> make_tasks(const std::vector<int64_t>& len, int64_t D, int64_t max_slices = 0) {
  const int64_t B = static_cast<int64_t>(len.size());
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return len[a] > len[b]; });
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t slices = max_slices > 0 ? max_slices : std::max<int64_t>(1, threads / D);
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
inline int64_t active_rows(const Task& task, const std::vector<int64_t>& len, int64_t t, int64_t n_prev) {
  int64_t n = n_prev;
  while (n > 0 && len[task.rows[n - 1]] <= t) --n;
  while (n < static_cast<int64_t>(task.rows.size()) && len[task.rows[n]] > t) ++n;
  return n;
}

template <typename Fn>
void run_tasks(int64_t n_tasks, const Fn& fn) {
  // One fork/join for the whole call. Below autograd: the ATen calls inside are plain kernels.
  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t k = begin; k < end; ++k) fn(k);
  });
}

}  // namespace bilstm_native
