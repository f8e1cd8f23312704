"""The dtypes torch's recurrent modules return under autocast, for every backend's stack.

Custom ops are outside autocast's op lists, so a layer on fastpar's kernels (Triton, or torch's
inside ``fastpar::*_aten_layer``) runs wholly in autocast's dtype. ``autocast_carried_dtype`` is
the one rule for where torch's modules return another dtype, and ``carried_dtype_results`` the
one cast of a layer's results to it, which ``reference.stack_layers`` makes for every stack.
"""

from __future__ import annotations

import torch
from torch import Tensor


def autocast_carried_dtype(
    x: Tensor, carried: Tensor | None, *, onednn: bool = False
) -> torch.dtype | None:
    """Under autocast, the dtype torch's module returns the state its loop carries by
    elementwise ops in (the LSTM's c, the GRU's h; ``carried``, its initial value), and the
    results elementwise from it (the LSTM's h without a projection); None where that is
    autocast's dtype, in which the layers run whole.

    A fused kernel that autocast casts whole returns everything in autocast's dtype: cuDNN's
    on CUDA (the layers there run on cuDNN), oneDNN's LSTM on CPU (``onednn``, decided once for
    the stack from its input, as torch.nn.LSTM decides). torch's loop elsewhere (CPU) is cast
    op by op: its matmuls run in autocast's dtype, and the elementwise update of the carried
    state promotes to that state's dtype, so a float32 c_0 (LSTM) or h_0 (GRU) keeps it and its
    results float32. The RNN carries nothing elementwise (h is tanh or relu of matmuls):
    ``carried`` None. Float64, which autocast leaves alone, stays float64 by itself.

    Arguments:
        x: (T, B, I) the stack's input; carried: the initial carried state, or None.
        onednn: torch's module runs this stack on oneDNN (``lstm_aten.autocast_runs_onednn``).
    """
    device = x.device.type
    if carried is None or onednn or device != "cpu" or not torch.is_autocast_enabled(device):
        return None
    autocast_dtype = torch.get_autocast_dtype(device)
    dtype = torch.promote_types(autocast_dtype, carried.dtype)
    return None if dtype == autocast_dtype else dtype


def carried_dtype_results(
    out: Tensor, finals: tuple[Tensor, ...], carried: torch.dtype | None, *, projected: bool
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One layer's results in the dtypes torch's loop returns them in, given ``carried`` from
    ``autocast_carried_dtype`` (None: unchanged).

    The last final state is the carried one (the LSTM's c_n, the GRU's h_n): in ``carried``.
    The output and the other states (the LSTM's h) are elementwise from it (h_t = o * tanh(c_t))
    and take it too, unless a projection (a matmul, in autocast's dtype) follows (``projected``).
    """
    if carried is None:
        return out, finals
    *others, last = finals
    if not projected:
        out, others = out.to(carried), [s.to(carried) for s in others]
    return out, (*others, last.to(carried))
