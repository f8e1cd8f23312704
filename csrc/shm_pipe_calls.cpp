// CPython calls of the shared-memory pipe (see shm_pipe_calls.h): METH_FASTCALL functions whose
// `self` is a capsule holding the endpoint.
#include "shm_pipe_calls.h"

#include <ATen/EmptyTensor.h>
#include <torch/csrc/autograd/python_variable.h>

#include <exception>
#include <string>

#include "shm_pipe.h"

namespace fastpar {
namespace {

constexpr const char* kCapsuleName = "fastpar.ShmTensorPipe.calls";

struct Bound {
  ShmTensorPipe* pipe;
  PyObject* owner;  // strong references, dropped with the capsule
  PyObject* aborted_error;
  PyObject* broken_error;
  PyObject* on_error;
};

void drop_bound_fields(Bound* bound) {
  Py_XDECREF(bound->owner);
  Py_XDECREF(bound->aborted_error);
  Py_XDECREF(bound->broken_error);
  Py_XDECREF(bound->on_error);
  delete bound;
}

void drop_bound(PyObject* capsule) {
  auto* bound = static_cast<Bound*>(PyCapsule_GetPointer(capsule, kCapsuleName));
  if (bound != nullptr) drop_bound_fields(bound);
}

// Replaces the Python error set by raise_current with on_error(error, call, argument), raised
// from it; an error of on_error itself propagates instead. Returns nullptr.
PyObject* reword(const Bound& bound, const char* call, PyObject* argument) {
  PyObject* type = nullptr;
  PyObject* error = nullptr;
  PyObject* traceback = nullptr;
  PyErr_Fetch(&type, &error, &traceback);
  PyErr_NormalizeException(&type, &error, &traceback);
  if (traceback != nullptr) PyException_SetTraceback(error, traceback);
  Py_XDECREF(type);
  Py_XDECREF(traceback);
  PyObject* raised = PyObject_CallFunction(bound.on_error, "OsO", error, call, argument);
  if (raised == nullptr || !PyExceptionInstance_Check(raised)) {
    if (raised != nullptr) {
      Py_DECREF(raised);
      PyErr_SetString(PyExc_TypeError, "on_error must return an exception");
    }
    Py_DECREF(error);
    return nullptr;
  }
  if (raised != error) {
    PyException_SetCause(raised, error);  // steals `error`: raise raised from error
  } else {
    Py_DECREF(error);
  }
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(raised)), raised);
  Py_DECREF(raised);
  return nullptr;
}

// Sets the Python error for the exception being handled (as pybind11 and torch translate them)
// and returns nullptr.
PyObject* raise_current(const Bound& bound) {
  try {
    throw;
  } catch (const PipeAbortedError& error) {
    PyErr_SetString(bound.aborted_error, error.what());
  } catch (const PipeBrokenError& error) {
    PyErr_SetString(bound.broken_error, error.what());
  } catch (const c10::ValueError& error) {
    PyErr_SetString(PyExc_ValueError, error.what_without_backtrace());
  } catch (const c10::TypeError& error) {
    PyErr_SetString(PyExc_TypeError, error.what_without_backtrace());
  } catch (const c10::Error& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what_without_backtrace());
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
  }
  return nullptr;
}

// Releases the GIL for a wait, like py::gil_scoped_release without pybind11's internals.
class WithoutGil {
 public:
  WithoutGil() : state_(PyEval_SaveThread()) {}
  ~WithoutGil() { PyEval_RestoreThread(state_); }
  WithoutGil(const WithoutGil&) = delete;
  WithoutGil& operator=(const WithoutGil&) = delete;

 private:
  PyThreadState* state_;
};

Bound& bound_of(PyObject* self) {
  return *static_cast<Bound*>(PyCapsule_GetPointer(self, kCapsuleName));
}

// A send of the one tensor argument (`what`, when given, is unused: it is there so that the
// functions have the signatures of a pipeline link's): `send_tensor(pipe, tensor)` never waits
// for the peer, so the GIL is kept.
template <typename SendTensor>
PyObject* send_call(PyObject* self, PyObject* const* args, Py_ssize_t nargs, const char* usage,
                    SendTensor&& send_tensor) {
  Bound& bound = bound_of(self);
  if (nargs < 1 || nargs > 2 || !THPVariable_Check(args[0])) {
    PyErr_SetString(PyExc_TypeError, usage);
    return reword(bound, "send", nargs >= 1 ? args[0] : Py_None);
  }
  try {
    send_tensor(*bound.pipe, THPVariable_Unpack(args[0]));
  } catch (...) {
    raise_current(bound);
    return reword(bound, "send", args[0]);
  }
  Py_RETURN_NONE;
}

PyObject* send(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  return send_call(self, args, nargs, "send(tensor, what=None) takes a torch.Tensor",
                   [](ShmTensorPipe& pipe, const at::Tensor& tensor) { pipe.send(tensor); });
}

// Sends the gradient a stage's input leaf got in its backward: its .grad, zeros like it where it
// got none, an empty float tensor where it carries no gradient (does not require grad); without
// making a Python object of the gradient.
PyObject* send_input_grad(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  return send_call(self, args, nargs, "send_input_grad(leaf, what=None) takes a torch.Tensor",
                   [](ShmTensorPipe& pipe, const at::Tensor& leaf) {
                     if (!leaf.requires_grad()) {
                       pipe.send(at::detail::empty_cpu({0}, at::kFloat));
                     } else if (const at::Tensor& grad = leaf.grad(); grad.defined()) {
                       pipe.send(grad);
                     } else {
                       pipe.send(at::zeros_like(leaf));
                     }
                   });
}

// recv(what, leaf=False): waits for the peer's next tensor without the GIL.
PyObject* recv(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  Bound& bound = bound_of(self);
  if (nargs < 1 || nargs > 2 || !PyUnicode_Check(args[0]) ||
      (nargs == 2 && !PyBool_Check(args[1]))) {
    PyErr_SetString(PyExc_TypeError, "recv(what, leaf=False) takes a str and a bool");
    return reword(bound, "recv", nargs >= 1 ? args[0] : Py_None);
  }
  Py_ssize_t length = 0;
  const char* what = PyUnicode_AsUTF8AndSize(args[0], &length);
  if (what == nullptr) return nullptr;
  const bool leaf = nargs == 2 && args[1] == Py_True;
  at::Tensor tensor;
  try {
    const std::string name(what, static_cast<size_t>(length));
    const WithoutGil unlocked;
    tensor = bound.pipe->recv(name, leaf);
  } catch (...) {
    raise_current(bound);
    return reword(bound, "recv", args[0]);
  }
  return THPVariable_Wrap(std::move(tensor));
}

PyMethodDef kSend = {"send", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&send)),
                     METH_FASTCALL, "send(tensor, what=None): copy a CPU tensor into the pipe"};
PyMethodDef kSendInputGrad = {
    "send_input_grad",
    reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&send_input_grad)), METH_FASTCALL,
    "send_input_grad(leaf, what=None): send the gradient of a stage's input leaf"};
PyMethodDef kRecv = {"recv", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&recv)),
                     METH_FASTCALL, "recv(what, leaf=False): the peer's next tensor"};

}  // namespace

PyObject* shm_pipe_calls(PyObject* owner, ShmTensorPipe* pipe, PyObject* aborted_error,
                         PyObject* broken_error, PyObject* on_error) {
  if (!PyCallable_Check(on_error)) {
    PyErr_SetString(PyExc_TypeError, "on_error must be callable");
    return nullptr;
  }
  auto* bound = new Bound{pipe, owner, aborted_error, broken_error, on_error};
  Py_INCREF(owner);
  Py_INCREF(aborted_error);
  Py_INCREF(broken_error);
  Py_INCREF(on_error);
  PyObject* capsule = PyCapsule_New(bound, kCapsuleName, &drop_bound);
  if (capsule == nullptr) {
    drop_bound_fields(bound);
    return nullptr;
  }
  PyObject* calls = PyTuple_New(3);
  PyMethodDef* defs[3] = {&kSend, &kRecv, &kSendInputGrad};
  for (Py_ssize_t index = 0; calls != nullptr && index < 3; ++index) {
    PyObject* call = PyCFunction_NewEx(defs[index], capsule, nullptr);
    if (call == nullptr) {
      Py_CLEAR(calls);
    } else {
      PyTuple_SET_ITEM(calls, index, call);  // steals `call`
    }
  }
  Py_DECREF(capsule);  // the functions hold it
  return calls;
}

}  // namespace fastpar
