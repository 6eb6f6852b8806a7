// One task's forward or backward sweep of one layer (forward.cpp, backward.cpp), for a layer's own
// call and for the stack's wavefront (stack.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "tasks.h"

namespace bilstm_native {

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

// A layer's inputs and outputs, as forward_sweep lays them out (w_hr undefined without a
// projection; gates and cs only with save).
struct LayerForward {
  Projections input;
  at::Tensor w_hh, w_hr, h0, c0;
  at::Tensor out, h_n, c_n, gates, cs;
  bool save;
};

// A layer's backward inputs and outputs, as recurrence_backward lays them out (w_hr and dhs
// undefined without a projection).
struct LayerBackward {
  at::Tensor dout, dh_n, dc_n, w_hh, w_hr, gates, cs, c0;
  at::Tensor dgates, dh0, dc0, dhs;
};

// What a task does between its steps when it is one stage of a wavefront (stack.cpp); all empty
// for a layer on its own.
struct StepHooks {
  // before the task reads steps t .. t + count - 1 of its input (x going forward, dout going
  // back): to wait until they are written
  std::function<void(const Task& task, int64_t t, int64_t count)> before_block;
  // after every row of the task has its result at step t (out, or dgates going back): to pass it on
  std::function<void(const Task& task, int64_t t)> after_step;
  // the most steps per block (forward: 0 lets forward.cpp's BLOCK_BYTES decide; backward: at
  // least 1 wherever before_block is set)
  int64_t block_steps = 0;
};

void forward_task(const LayerForward& layer, const Task& task, const std::vector<int64_t>& len,
                  const StepHooks& hooks);
void backward_task(const LayerBackward& layer, const Task& task, const std::vector<int64_t>& len,
                   const StepHooks& hooks);

}  // namespace bilstm_native
