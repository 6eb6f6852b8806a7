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
//
// Files, one seam each:
//   activations.h   the activation functions and the SIMD macros
//   step_loops.*    the fused per-step loops (multiversioned: AVX-512, AVX2, baseline)
//   step_gemm.h     the step GEMM (StepGemm: packed brgemm panels or ATen's mm)
//   tasks.h         the work split into tasks and the one fork/join per call
//   forward.cpp     recurrence_forward, layer_forward (and the tasks' input projection blocks)
//   forward.h       one task's forward sweep of one layer, with the hooks a wavefront stage needs
//   stack.cpp       stack_forward, stack_backward: a unidirectional stack's layers as a wavefront of tasks
//   backward.cpp    recurrence_backward, layer_gradients (the GEMMs after the recurrence)
//   bindings.cpp    the Python module
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

namespace bilstm_native {

// The entry points (bindings.cpp): see kernels/native.py and kernels/contract.py.
std::vector<at::Tensor> recurrence_forward(const at::Tensor& gx, const at::Tensor& w_hh, const at::Tensor& h0,
                                           const at::Tensor& c0, const c10::optional<at::Tensor>& lengths,
                                           bool save, const c10::optional<at::Tensor>& w_hr);
std::vector<at::Tensor> layer_forward(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
                                      const c10::optional<at::Tensor>& lengths, bool save);
std::vector<at::Tensor> recurrence_backward(const at::Tensor& dout, const at::Tensor& dh_n, const at::Tensor& dc_n,
                                            const at::Tensor& w_hh, const at::Tensor& gates, const at::Tensor& cs,
                                            const at::Tensor& c0, const c10::optional<at::Tensor>& lengths,
                                            const c10::optional<at::Tensor>& w_hr);
std::vector<at::Tensor> layer_gradients(const at::Tensor& dgates, const at::Tensor& x,
                                        const c10::optional<at::Tensor>& h_prev, const at::Tensor& w_ih,
                                        bool need_dx, const std::vector<bool>& need_w_ih,
                                        const std::vector<bool>& need_w_hh, const std::vector<bool>& need_bias);
std::vector<at::Tensor> stack_forward(const at::Tensor& x, const std::vector<at::Tensor>& w_ih,
                                      const std::vector<at::Tensor>& bias, const std::vector<at::Tensor>& w_hh,
                                      const at::Tensor& h0, const at::Tensor& c0,
                                      const c10::optional<at::Tensor>& lengths, bool save,
                                      const std::vector<at::Tensor>& masks, int64_t groups);
std::vector<at::Tensor> stack_backward(const at::Tensor& dout, const at::Tensor& dh_n, const at::Tensor& dc_n,
                                       const std::vector<at::Tensor>& w_ih, const std::vector<at::Tensor>& w_hh,
                                       const std::vector<at::Tensor>& gates, const std::vector<at::Tensor>& cs,
                                       const at::Tensor& c0, const c10::optional<at::Tensor>& lengths,
                                       const std::vector<at::Tensor>& masks, int64_t groups);
std::string simd_level();

// Shared by the forward and the backward (forward.cpp). The dtypes the recurrence runs in, and the
// dtype of its cell state and accumulation for each (fp32 for bf16 and fp16).
bool supported_dtype(at::ScalarType dt);
at::ScalarType acc_dtype(at::ScalarType dt);
void check_inputs(const at::Tensor& gx, const at::Tensor& w_hh, const c10::optional<at::Tensor>& w_hr);
at::Tensor projection_weight(const c10::optional<at::Tensor>& w_hr, const at::ScalarType dtype);

}  // namespace bilstm_native
