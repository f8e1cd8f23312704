// Python bindings only: every function bound here is implemented (and its arguments checked)
// in the torch glue files declared by glue.h.
#include <torch/extension.h>

#include "glue.h"
#include "shm_pipe_calls.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastpar native extension: reduction kernels, the ring all-reduce, the pipeline pipe";
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
  py::register_exception<fastpar::RingTimeoutError>(m, "RingTimeoutError", PyExc_TimeoutError);
  py::register_exception<fastpar::RingMismatchError>(m, "RingMismatchError", PyExc_ValueError);
  py::register_exception<fastpar::RingClosedError>(m, "RingClosedError", PyExc_RuntimeError);
  py::class_<fastpar::ShmAllReduce>(m, "ShmAllReduce",
                                    "all-reduce of CPU tensors through shared memory")
      .def(py::init<const std::string&, bool, int64_t, int64_t, int64_t, int64_t, double>(),
           py::kw_only(), py::arg("name"), py::arg("create"), py::arg("rank"), py::arg("world"),
           py::arg("slots"), py::arg("chunk_bytes"), py::arg("timeout_s"))
      .def("unlink", &fastpar::ShmAllReduce::unlink)
      .def("all_reduce", &fastpar::ShmAllReduce::all_reduce, py::arg("tensor"), py::arg("op"),
           py::call_guard<py::gil_scoped_release>())
      .def("register_area", &fastpar::ShmAllReduce::register_area, py::arg("areas"))
      .def("agree_torch_path", &fastpar::ShmAllReduce::agree_torch_path, py::arg("tensor"),
           py::arg("op"), py::call_guard<py::gil_scoped_release>())
      .def("close", &fastpar::ShmAllReduce::close, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("closed", &fastpar::ShmAllReduce::closed)
      .def_property_readonly("failure", &fastpar::ShmAllReduce::failure);
  py::class_<fastpar::PeerWatchdog>(
      m, "PeerWatchdog", "a thread that reports the first watched process found gone")
      .def(py::init([](std::vector<int64_t> pids, double period_s) {
             return std::make_unique<fastpar::PeerWatchdog>(std::move(pids), period_s,
                                                            [](int) {});
           }),
           py::kw_only(), py::arg("pids"), py::arg("period_s"))
      .def_property_readonly("culprit", &fastpar::PeerWatchdog::culprit);
  m.def("remove_shared_segment", &fastpar::SharedSegment::remove,
        "removes a shared-memory segment's name (idempotent)", py::arg("name"));
  m.attr("PIPE_ABORT_TEXT_BYTES") = fastpar::ShmPipe::kMaxAbortText;
  PyObject* const aborted_error =
      py::register_exception<fastpar::PipeAbortedError>(m, "PipeAbortedError", PyExc_RuntimeError)
          .ptr();
  PyObject* const broken_error =
      py::register_exception<fastpar::PipeBrokenError>(m, "PipeBrokenError", PyExc_RuntimeError)
          .ptr();
  {
    using Pipe = fastpar::ShmTensorPipe;
    const auto release = py::call_guard<py::gil_scoped_release>();
    const auto calls = [aborted_error, broken_error](py::object self, py::object on_error) {
      PyObject* tuple = fastpar::shm_pipe_calls(self.ptr(), self.cast<Pipe*>(), aborted_error,
                                                broken_error, on_error.ptr());
      if (tuple == nullptr) throw py::error_already_set();
      return py::reinterpret_steal<py::tuple>(tuple);
    };
    py::class_<Pipe>(m, "ShmTensorPipe", "CPU tensors between two processes through shared memory")
        .def(py::init<const std::string&, bool, int64_t, double, int64_t,
                      const std::vector<at::ScalarType>&>(),
             py::arg("name"), py::arg("create"), py::arg("capacity"), py::arg("timeout_s"),
             py::kw_only(), py::arg("max_dims") = 64,
             py::arg("dtypes") = std::vector<at::ScalarType>())
        .def("unlink", &Pipe::unlink)
        .def("connect", &Pipe::connect)
        .def("send", &Pipe::send, py::arg("tensor"))  // never waits: keeps the GIL
        .def("flush", &Pipe::flush, release)
        .def("recv", &Pipe::recv, py::arg("what"), py::arg("leaf") = false, release)
        .def("abort", &Pipe::abort, py::arg("text"), release)
        .def("close", &Pipe::close, release)
        .def("calls", calls, py::arg("on_error"),
             "(send, recv) as plain CPython functions (see shm_pipe_calls.h)")
        .def_property_readonly("closed", &Pipe::closed)
        .def_property_readonly("failure", &Pipe::failure)
        .def_property_readonly("deferred_sends", &Pipe::deferred_sends)
        .def_property_readonly("capacity", &Pipe::capacity);
  }
#ifdef FASTPAR_WITH_CUDA
  {
    using Ring = fastpar::IpcAllReduce;
    const auto release = py::call_guard<py::gil_scoped_release>();
    py::class_<Ring>(m, "IpcAllReduce", "all-reduce of CUDA tensors through CUDA IPC")
        .def(py::init<int64_t, int64_t, int64_t, int64_t, double>(), py::kw_only(),
             py::arg("rank"), py::arg("world"), py::arg("device"), py::arg("chunk_bytes"),
             py::arg("timeout_s"))
        .def("handle", &Ring::handle)
        .def_property_readonly("buffer_address", &Ring::buffer_address)
        .def("connect", &Ring::connect, py::arg("handles"))
        .def("connect_local", &Ring::connect_local, py::arg("addresses"))
        .def("all_reduce", &Ring::all_reduce, py::arg("tensor"), py::arg("op"), py::kw_only(),
             py::arg("block_current_stream"))
        .def("agree_torch_path", &Ring::agree_torch_path, py::arg("tensor"), py::arg("op"),
             release)
        .def("watch_peers", &Ring::watch_peers, py::arg("pids"))
        .def("check", &Ring::check)
        .def_property_readonly("stream_handle", &Ring::stream_handle)
        .def("stop", &Ring::stop, release)
        .def("free", &Ring::free, release)
        .def("close", &Ring::close, release)
        .def_property_readonly("closed", &Ring::closed)
        .def_property_readonly("failure", &Ring::failure)
        .def_property_readonly("failed_call", &Ring::failed_call);
  }
#endif
}
