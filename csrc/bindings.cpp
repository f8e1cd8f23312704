// Python bindings only: every function bound here is implemented (and its arguments checked)
// in the torch glue files declared by torch_glue.h.
#include <torch/extension.h>

#include "torch_glue.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastpar native extension: reduction kernels and the ring all-reduce";
#ifdef FASTPAR_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("reduce_buffers_cpu", &fastpar::reduce_buffers_cpu, "out = inputs[0] op ... op inputs[k-1]",
        py::arg("inputs"), py::arg("out"), py::arg("op"),
        py::call_guard<py::gil_scoped_release>());
#ifdef FASTPAR_WITH_CUDA
  m.def("reduce_buffers_cuda", &fastpar::reduce_buffers_cuda,
        "out = inputs[0] op ... op inputs[k-1] on the current CUDA stream", py::arg("inputs"),
        py::arg("out"), py::arg("op"));
#endif
}
