// The shared-memory pipe's send and recv as plain CPython functions bound to one endpoint.
#pragma once

#include <Python.h>

#include "glue.h"

namespace fastpar {

// A new tuple (send, recv, send_input_grad) of builtin functions bound to `pipe`, whose Python
// object `owner` they keep alive: send(tensor, what=None) -> None, recv(what, leaf=False) ->
// Tensor and send_input_grad(leaf, what=None) -> None (sends the leaf's .grad; zeros like it
// where it has none; an empty float tensor where it does not require grad), the signatures of a
// pipeline link's, doing what the pybind methods send and recv do, but called
// without pybind11's dispatch (overload lookup, type casters, holder lookup), which costs about
// 10 us when its code is cold, as it is after every stage's compute: more than the transfer.
//
// Errors: a pipe failure is first PipeAbortedError / PipeBrokenError (`aborted_error`,
// `broken_error`: the module's), a refused tensor ValueError or TypeError (as through pybind);
// then `on_error(error, "send" or "recv", the tensor, leaf or what)` returns the exception to
// raise instead (raised from the first, or the first itself when it returns it), so the
// caller's wording costs nothing until something fails. nullptr with a Python error set on
// failure.
PyObject* shm_pipe_calls(PyObject* owner, ShmTensorPipe* pipe, PyObject* aborted_error,
                         PyObject* broken_error, PyObject* on_error);

}  // namespace fastpar
