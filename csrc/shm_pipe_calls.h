// The shared-memory pipe's send and recv as plain CPython functions bound to one endpoint.
#pragma once

#include <Python.h>

#include "glue.h"

namespace fastpar {

// A new tuple (send, recv) of builtin functions bound to `pipe`, whose Python object `owner`
// they keep alive: send(tensor) -> None and recv(what: str, leaf: bool) -> Tensor, as the
// pybind methods of the same names but called without pybind11's dispatch (overload lookup,
// type casters, holder lookup), which costs about 10 us when its code is cold, as it is after
// every stage's compute: more than the transfer itself. A pipe failure raises `aborted_error`
// or `broken_error` (the module's PipeAbortedError / PipeBrokenError); a tensor send refuses
// raises ValueError or TypeError, as through pybind. nullptr with a Python error set on failure.
PyObject* shm_pipe_calls(PyObject* owner, ShmTensorPipe* pipe, PyObject* aborted_error,
                         PyObject* broken_error);

}  // namespace fastpar
