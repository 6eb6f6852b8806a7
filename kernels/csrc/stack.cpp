// A unidirectional stack of layers in one call, as a wavefront: the forward (stack_forward) and
// the backward's recurrence (stack_backward).
//
// A unidirectional layer has one direction: no second task to give the other thread, only a
// split of its batch rows, and a fork/join per layer. A stack has one more degree of freedom:
// layer l + 1 can run step t while layer l runs step t + 1. The layers are cut into `groups`
// runs of consecutive layers (stages) of about equal work, and the batch rows into slices (as a
// single layer splits them); each (stage, slice) is one task, all in one fork/join. A task runs
// its stage's layers one after the other on its rows. A layer hands its output to the next
// through that output itself ([T, B, H], which the backward keeps anyway): after each step the
// producer publishes how many steps of its rows are written, and the consumer waits for a block
// of steps before it projects them (forward.h's hooks). Rows never cross slices: a slice of
// layer l + 1 reads only the same slice of layer l. Tasks only wait for tasks of a lower index,
// so the calls finish whatever threads the fork/join gets, one included.
//
// groups = 1 is the batch split of every layer without the fork/join between layers; groups =
// layers with one slice is the pure wavefront. Which one runs is chosen by the caller
// (kernels/native.py: stack_schedule, from the benchmark's measurements).
//
// Dropout between layers: masks [T, B, H] drawn by the caller as nn.LSTM draws them (the
// dropout of a tensor of ones: the same numbers under the same seed); the producer multiplies
// its rows of each step by the mask, as F.dropout does (the same bits), into the next layer's
// input.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>

#include "forward.h"
#include "native.h"
#include "step_gemm.h"  // gradient_gemm_dtype
#include "tasks.h"

namespace bilstm_native {

// Rows a consumer's projection block aims for: enough for an efficient GEMM, in as few steps as
// that takes, since the consumer starts one block behind its producer. Overridable for
// measurements (BILSTM_FAST_WAVEFRONT_ROWS).
static int64_t wavefront_block_rows() {
  static const int64_t value = positive_env("BILSTM_FAST_WAVEFRONT_ROWS", 64);
  return value;
}

// The stage of each layer: layers 0..L-1 cut into `groups` runs of consecutive layers whose
// largest work (per token, 4H (I_l + H) multiply-adds per layer: cost[l] = I_l + H) is least.
static std::vector<int64_t> stage_of_layers(const std::vector<int64_t>& cost, int64_t groups) {
  const int64_t L = static_cast<int64_t>(cost.size());
  // best[g][l]: the least largest-stage work of layers 0..l-1 in g stages; cut[g][l]: its last cut
  std::vector<std::vector<int64_t>> best(groups + 1, std::vector<int64_t>(L + 1, INT64_MAX));
  std::vector<std::vector<int64_t>> cut(groups + 1, std::vector<int64_t>(L + 1, 0));
  best[0][0] = 0;
  for (int64_t g = 1; g <= groups; ++g) {
    for (int64_t l = g; l <= L; ++l) {
      int64_t work = 0;
      for (int64_t first = l - 1; first >= g - 1; --first) {  // the last stage is layers first..l-1
        work += cost[first];
        if (best[g - 1][first] == INT64_MAX) continue;
        const int64_t worst = std::max(best[g - 1][first], work);
        if (worst < best[g][l]) best[g][l] = worst, cut[g][l] = first;
      }
    }
  }
  std::vector<int64_t> stage(L);
  for (int64_t g = groups, l = L; g > 0; l = cut[g][l], --g)
    for (int64_t j = cut[g][l]; j < l; ++j) stage[j] = g - 1;
  return stage;
}

// Wait until a producer has published `steps` steps: a short spin (a step takes microseconds),
// then yielding the core, so a producer that shares it (a loaded machine) gets to run.
static void wait_for(const std::atomic<int64_t>& done, int64_t steps) {
  for (int spins = 0; done.load(std::memory_order_acquire) < steps; ++spins) {
    if (spins < 4096) {
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

// The tasks of a wavefront: `stages` stages (stage[l]: layer l's) times the batch slices (as a
// single layer splits its rows, with the threads shared among the stages), task i = stage i / K,
// slice i % K, and one progress counter per (layer, slice) that its producer publishes to.
struct Wavefront {
  Wavefront(const std::vector<int64_t>& len, int64_t L, int64_t stages, std::vector<int64_t> stage_of_layer)
      : stages(stages), stage(std::move(stage_of_layer)),
        slices(make_tasks(len, 1, std::max<int64_t>(1, at::get_num_threads() / stages))),
        K(static_cast<int64_t>(slices.size())), progress(new std::atomic<int64_t>[L * K]) {
    for (int64_t i = 0; i < L * K; ++i) progress[i].store(0, std::memory_order_relaxed);
  }

  std::atomic<int64_t>& done(int64_t l, int64_t k) { return progress[l * K + k]; }

  // fn(g, k, slice) for every task, in one fork/join
  template <typename Fn>
  void run(const Fn& fn) {
    run_tasks(stages * K, [&](int64_t i) { fn(i / K, i % K, slices[i % K]); });
  }

  const int64_t stages;
  const std::vector<int64_t> stage;
  const std::vector<Task> slices;
  const int64_t K;
  std::unique_ptr<std::atomic<int64_t>[]> progress;
};

// dropped = out * mask on the task's rows at step t ([T, B, H] each): F.dropout's product.
template <typename S>
static void drop_rows(const Task& task, int64_t t, const at::Tensor& out, const at::Tensor& mask,
                      const at::Tensor& dropped) {
  const int64_t B = out.size(1), H = out.size(3);
  const S* o = out.data_ptr<S>();
  const S* m = mask.data_ptr<S>();
  S* x = dropped.data_ptr<S>();
  for (int64_t b : task.rows) {
    const int64_t at = (t * B + b) * H;
    for (int64_t j = 0; j < H; ++j) x[at + j] = o[at + j] * m[at + j];
  }
}

// x [T, B, I]; per layer w_ih [4H, I_l], w_hh [4H, H] and (bias non-empty) the summed bias [4H];
// h0, c0 [L, B, H]; masks empty or L - 1 of [T, B, H]. -> h_n, c_n [L, B, H], then each layer's
// out [T, B, 1, H], with save each layer's gates and cs, then with masks each dropped input.
std::vector<at::Tensor> stack_forward(const at::Tensor& x_in, const std::vector<at::Tensor>& w_ih,
                                      const std::vector<at::Tensor>& bias, const std::vector<at::Tensor>& w_hh,
                                      const at::Tensor& h0_in, const at::Tensor& c0_in,
                                      const c10::optional<at::Tensor>& lengths, bool save,
                                      const std::vector<at::Tensor>& masks, int64_t groups) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 3, "native stack_forward: x must be a CPU [T, B, I] tensor");
  const auto dt = x_in.scalar_type(), acc = acc_dtype(dt);
  TORCH_CHECK(supported_dtype(dt), "native stack_forward: float32, float64, bfloat16 or float16 only");
  const int64_t L = static_cast<int64_t>(w_ih.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(w_hh.size()) == L && (bias.empty() || static_cast<int64_t>(bias.size()) == L),
              "native stack_forward: one w_ih, w_hh (and bias) per layer");
  TORCH_CHECK(masks.empty() || static_cast<int64_t>(masks.size()) == L - 1,
              "native stack_forward: one dropout mask between each two layers, or none");
  TORCH_CHECK(groups >= 1, "native stack_forward: groups must be at least 1");
  const int64_t T = x_in.size(0), B = x_in.size(1), H = w_hh[0].size(1);
  at::Tensor h0 = h0_in.to(dt).contiguous();
  at::Tensor c0 = c0_in.to(acc).contiguous();
  TORCH_CHECK(h0.sizes() == at::IntArrayRef({L, B, H}) && c0.sizes() == h0.sizes(),
              "native stack_forward: h0 and c0 must be [L, B, H]");
  const auto opts = x_in.options();
  at::Tensor h_n = at::empty({L, B, H}, opts);
  at::Tensor c_n = at::empty({L, B, H}, opts);
  std::vector<LayerForward> layers(L);
  std::vector<at::Tensor> dropped(masks.empty() ? 0 : L - 1), mask(masks.size());
  std::vector<int64_t> cost(L);
  for (int64_t l = 0; l < L; ++l) {
    LayerForward& layer = layers[l];
    const at::Tensor& x = l == 0 ? x_in.contiguous() : masks.empty() ? layers[l - 1].out.view({T, B, H}) : dropped[l - 1];
    TORCH_CHECK(w_ih[l].dim() == 2 && w_ih[l].size(0) == 4 * H && w_ih[l].size(1) == x.size(2) &&
                    w_hh[l].dim() == 2 && w_hh[l].size(0) == 4 * H && w_hh[l].size(1) == H,
                "native stack_forward: layer ", l, " needs w_ih [4H, I] and w_hh [4H, H]");
    layer.input.x = x;
    layer.input.w_ih = w_ih[l].to(dt).contiguous().unsqueeze(0);
    if (!bias.empty()) layer.input.bias = bias[l].to(acc).contiguous().view({1, 4 * H});
    layer.w_hh = w_hh[l].to(dt).contiguous().unsqueeze(0);
    layer.h0 = h0.narrow(0, l, 1);
    layer.c0 = c0.narrow(0, l, 1);
    layer.out = at::empty({T, B, 1, H}, opts);
    layer.h_n = h_n.narrow(0, l, 1);
    layer.c_n = c_n.narrow(0, l, 1);
    layer.save = save;
    if (save) {
      layer.gates = at::empty({T, B, 1, 4 * H}, opts.dtype(acc));
      layer.cs = at::empty({T, B, 1, H}, opts.dtype(acc));
    }
    if (!masks.empty() && l < L - 1) {
      TORCH_CHECK(masks[l].sizes() == at::IntArrayRef({T, B, H}), "native stack_forward: masks must be [T, B, H]");
      mask[l] = masks[l].to(dt).contiguous();
      dropped[l] = at::empty({T, B, H}, opts);
    }
    cost[l] = x.size(2) + H;
  }
  if (T > 0 && B > 0 && H > 0) {
    const std::vector<int64_t> len = lengths_vector(lengths, B, T);
    const int64_t stages = std::min(groups, L);
    // done(l, k): the steps of layer l's slice k whose output (and dropped input) is written
    Wavefront wave(len, L, stages, stage_of_layers(cost, stages));
    wave.run([&](int64_t g, int64_t k, const Task& task) {
      for (int64_t l = 0; l < L; ++l) {
        if (wave.stage[l] != g) continue;
        StepHooks hooks;
        if (l > 0) {
          const int64_t rows = static_cast<int64_t>(task.rows.size());
          hooks.block_steps = (wavefront_block_rows() + rows - 1) / rows;
          hooks.before_block = [&, l, k](const Task&, int64_t t, int64_t count) {
            wait_for(wave.done(l - 1, k), t + count);
          };
        }
        if (l < L - 1) {
          hooks.after_step = [&, l, k](const Task& task, int64_t t) {
            if (!masks.empty())
              AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "native dropout", [&] {
                drop_rows<scalar_t>(task, t, layers[l].out, mask[l], dropped[l]);
              });
            wave.done(l, k).store(t + 1, std::memory_order_release);
          };
        }
        forward_task(layers[l], task, len, hooks);
      }
    });
  } else {
    h_n.copy_(h0);
    c_n.copy_(c0);
    for (int64_t l = 0; l < L; ++l) layers[l].out.zero_();
    for (at::Tensor& d : dropped) d.zero_();
  }
  std::vector<at::Tensor> result{h_n, c_n};
  for (const LayerForward& layer : layers) result.push_back(layer.out);
  if (save) {
    for (const LayerForward& layer : layers) result.push_back(layer.gates);
    for (const LayerForward& layer : layers) result.push_back(layer.cs);
  }
  for (const at::Tensor& d : dropped) result.push_back(d);
  return result;
}

// The stage of each layer going back: the top layers first (the first stages, the lowest task
// numbers: each waits on the stage above it).
static std::vector<int64_t> backward_stages(std::vector<int64_t> cost, int64_t groups) {
  std::reverse(cost.begin(), cost.end());
  std::vector<int64_t> stage = stage_of_layers(cost, groups);
  std::reverse(stage.begin(), stage.end());
  return stage;
}

// The backward of stack_forward's recurrences, the layers as stages of a wavefront again, top
// layer first. Layer l's dout at a block of steps is the input gradient of layer l + 1 there,
// (its gate gradients) @ W_ih^{l+1} as layer_gradients forms it, times the dropout mask: layer
// l's task forms it, for its rows, once layer l + 1 has passed those steps. The weight and bias
// gradients are GEMMs after the recurrence (the caller's, as for one layer).
// dout [T, B, H] (the top layer's); dh_n, dc_n, c0 [L, B, H]; per layer w_ih, w_hh and the
// saved gates [T, B, 1, 4H] and cs [T, B, 1, H]; masks empty or L - 1 of [T, B, H].
// -> dh0, dc0 [L, B, H], then each layer's dgates [T, B, 1, 4H] (in Acc<S>, as recurrence_backward).
std::vector<at::Tensor> stack_backward(const at::Tensor& dout_in, const at::Tensor& dh_n_in, const at::Tensor& dc_n_in,
                                       const std::vector<at::Tensor>& w_ih, const std::vector<at::Tensor>& w_hh,
                                       const std::vector<at::Tensor>& gates, const std::vector<at::Tensor>& cs,
                                       const at::Tensor& c0_in, const c10::optional<at::Tensor>& lengths,
                                       const std::vector<at::Tensor>& masks, int64_t groups) {
  TORCH_CHECK(dout_in.device().is_cpu() && dout_in.dim() == 3, "native stack_backward: dout must be a CPU [T, B, H] tensor");
  const auto dt = dout_in.scalar_type(), acc = acc_dtype(dt);
  TORCH_CHECK(supported_dtype(dt), "native stack_backward: float32, float64, bfloat16 or float16 only");
  const int64_t L = static_cast<int64_t>(w_hh.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(w_ih.size()) == L && static_cast<int64_t>(gates.size()) == L &&
                  static_cast<int64_t>(cs.size()) == L,
              "native stack_backward: one w_ih, w_hh, gates and cs per layer");
  TORCH_CHECK(masks.empty() || static_cast<int64_t>(masks.size()) == L - 1,
              "native stack_backward: one dropout mask between each two layers, or none");
  TORCH_CHECK(groups >= 1, "native stack_backward: groups must be at least 1");
  const int64_t T = dout_in.size(0), B = dout_in.size(1), H = dout_in.size(2), G = 4 * H;
  at::Tensor dh_n = dh_n_in.to(acc).contiguous();
  at::Tensor dc_n = dc_n_in.to(acc).contiguous();
  at::Tensor c0 = c0_in.to(acc).contiguous();
  TORCH_CHECK(dh_n.sizes() == at::IntArrayRef({L, B, H}) && dc_n.sizes() == dh_n.sizes() && c0.sizes() == dh_n.sizes(),
              "native stack_backward: dh_n, dc_n and c0 must be [L, B, H]");
  const auto opts = dout_in.options();
  // the input gradient's GEMM as layer_gradients runs it: fp16 widened to fp32
  const auto gemm_dt = gradient_gemm_dtype(dt);
  at::Tensor dh0 = at::empty({L, B, H}, opts.dtype(acc));
  at::Tensor dc0 = at::empty({L, B, H}, opts.dtype(acc));
  std::vector<LayerBackward> layers(L);
  std::vector<at::Tensor> w_in(L), mask(masks.size());
  std::vector<int64_t> cost(L);
  for (int64_t l = 0; l < L; ++l) {
    LayerBackward& layer = layers[l];
    TORCH_CHECK(w_hh[l].dim() == 2 && w_hh[l].size(0) == G && w_hh[l].size(1) == H && w_ih[l].dim() == 2 &&
                    w_ih[l].size(0) == G && (l == 0 || w_ih[l].size(1) == H),
                "native stack_backward: layer ", l, " needs w_ih [4H, I] and w_hh [4H, H]");
    TORCH_CHECK(gates[l].sizes() == at::IntArrayRef({T, B, 1, G}) && cs[l].sizes() == at::IntArrayRef({T, B, 1, H}),
                "native stack_backward: layer ", l, "'s gates must be [T, B, 1, 4H] and cs [T, B, 1, H]");
    layer.dout = l == L - 1 ? dout_in.to(dt).contiguous().view({T, B, 1, H}) : at::empty({T, B, 1, H}, opts);
    layer.dh_n = dh_n.narrow(0, l, 1);
    layer.dc_n = dc_n.narrow(0, l, 1);
    layer.w_hh = w_hh[l].to(dt).contiguous().unsqueeze(0);
    layer.gates = gates[l].to(acc).contiguous();
    layer.cs = cs[l].to(acc).contiguous();
    layer.c0 = c0.narrow(0, l, 1);
    layer.dgates = at::empty({T, B, 1, G}, opts.dtype(acc));
    layer.dh0 = dh0.narrow(0, l, 1);
    layer.dc0 = dc0.narrow(0, l, 1);
    if (l > 0) w_in[l] = w_ih[l].to(gemm_dt).contiguous();
    if (!masks.empty() && l < L - 1) {
      TORCH_CHECK(masks[l].sizes() == at::IntArrayRef({T, B, H}), "native stack_backward: masks must be [T, B, H]");
      mask[l] = masks[l].to(dt).contiguous();
    }
    cost[l] = w_ih[l].size(1) + H;
  }
  if (T > 0 && B > 0 && H > 0) {
    const std::vector<int64_t> len = lengths_vector(lengths, B, T);
    const int64_t stages = std::min(groups, L);
    // done(l, k): the steps, counted from the last, of layer l's slice k whose gate gradients are written
    Wavefront wave(len, L, stages, backward_stages(cost, stages));
    wave.run([&](int64_t g, int64_t k, const Task& task) {
      const int64_t rows = static_cast<int64_t>(task.rows.size());
      const at::Tensor index = at::from_blob(const_cast<int64_t*>(task.rows.data()), {rows}, at::kLong);
      for (int64_t l = L - 1; l >= 0; --l) {
        if (wave.stage[l] != g) continue;
        StepHooks hooks;
        if (l < L - 1) {
          hooks.block_steps = (wavefront_block_rows() + rows - 1) / rows;
          hooks.before_block = [&, l, k](const Task&, int64_t t, int64_t count) {
            wait_for(wave.done(l + 1, k), T - t);
            // this task's rows of dout at steps t .. t + count - 1, from the layer above
            at::Tensor dg = layers[l + 1].dgates.narrow(0, t, count).view({count, B, G}).index_select(1, index);
            at::Tensor dx = at::mm(dg.view({count * rows, G}).to(gemm_dt), w_in[l + 1]).to(dt).view({count, rows, H});
            if (!masks.empty()) dx.mul_(mask[l].narrow(0, t, count).index_select(1, index));
            layers[l].dout.narrow(0, t, count).view({count, B, H}).index_copy_(1, index, dx);
          };
        }
        if (l > 0) {
          hooks.after_step = [&, l, k](const Task&, int64_t t) {
            wave.done(l, k).store(T - t, std::memory_order_release);
          };
        }
        backward_task(layers[l], task, len, hooks);
      }
    });
  } else {
    dh0.copy_(dh_n);
    dc0.copy_(dc_n);
    for (LayerBackward& layer : layers) layer.dgates.zero_();
  }
  std::vector<at::Tensor> result{dh0, dc0};
  for (const LayerBackward& layer : layers) result.push_back(layer.dgates);
  return result;
}

}  // namespace bilstm_native
