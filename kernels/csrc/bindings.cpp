// The Python bindings of the native recurrence (kernels/native.py loads them as _native).
#include <torch/csrc/utils/pybind.h>

#include <string>

#include "native.h"
#include "step_gemm.h"  // vnni_brgemm_usable

namespace bilstm_native {

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


}  // namespace bilstm_native


PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bilstm_fast native CPU recurrence (see kernels/native.py)";
  m.def("recurrence_forward", &bilstm_native::recurrence_forward, "forward sweep of one layer, all directions",
        py::arg("gx"), py::arg("w_hh"), py::arg("h0"), py::arg("c0"), py::arg("lengths"), py::arg("save"),
        py::arg("w_hr") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("recurrence_backward", &bilstm_native::recurrence_backward, "backward sweep of one layer, all directions",
        py::arg("dout"), py::arg("dh_n"), py::arg("dc_n"), py::arg("w_hh"), py::arg("gates"), py::arg("cs"),
        py::arg("c0"), py::arg("lengths"), py::arg("w_hr") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("layer_forward", &bilstm_native::layer_forward, "forward sweep of one layer from its input, the projection included",
        py::arg("x"), py::arg("w_ih"), py::arg("bias"), py::arg("w_hh"), py::arg("h0"), py::arg("c0"),
        py::arg("lengths"), py::arg("save"), py::call_guard<py::gil_scoped_release>());
  m.def("layer_gradients", &bilstm_native::layer_gradients, "the backward's input, weight and bias gradients after the recurrence",
        py::arg("dgates"), py::arg("x"), py::arg("h_prev"), py::arg("w_ih"), py::arg("need_dx"), py::arg("need_w_ih"),
        py::arg("need_w_hh"), py::arg("need_bias"), py::call_guard<py::gil_scoped_release>());
  m.def("stack_forward", &bilstm_native::stack_forward,
        "forward of a unidirectional stack of layers, the layers as a wavefront of tasks",
        py::arg("x"), py::arg("w_ih"), py::arg("bias"), py::arg("w_hh"), py::arg("h0"), py::arg("c0"),
        py::arg("lengths"), py::arg("save"), py::arg("masks"), py::arg("groups"),
        py::call_guard<py::gil_scoped_release>());
  m.def("stack_backward", &bilstm_native::stack_backward,
        "the backward's recurrences of a unidirectional stack of layers, the layers as a wavefront of tasks",
        py::arg("dout"), py::arg("dh_n"), py::arg("dc_n"), py::arg("w_ih"), py::arg("w_hh"), py::arg("gates"),
        py::arg("cs"), py::arg("c0"), py::arg("lengths"), py::arg("masks"), py::arg("groups"),
        py::call_guard<py::gil_scoped_release>());
  m.def("simd_level", &bilstm_native::simd_level, "the instruction-set level the fused loops run at on this CPU");
  m.def("vnni_brgemm", &bilstm_native::vnni_brgemm_usable,
        "whether bf16 step GEMMs run ATen's brgemm on VNNI-packed weights here (else fp32 GEMMs on widened operands)");
  m.def("openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "whether the extension was compiled with OpenMP (without it at::parallel_for runs serially)");
}

