"""backend="auto": the measured rule (fastpar.ops.auto_backend) on synthetic CUDA inputs, what
the modules ask it, the log, torch.compile, torch's whole-stack packed call; on a GPU, that auto
takes the expected path and matches torch's modules."""

from __future__ import annotations

import types

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastpar.nn
import fastpar.nn.recurrent
from fastpar.ops import aten_common
from fastpar.ops.auto_backend import MEASURED, AutoChoice, choose_auto_backend
from fastpar.ops.lstm_config import persistent_config
from fastpar.ops.reference import LayerWeights
from tests.nn.recurrent_helpers import TRITON_RECURRENCES, spy_triton
from tests.ops.lstm_helpers import randn

CUDA = torch.device("cuda")  # a device object only: nothing here runs on it
H200_SMS = 132
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# (cell, dtype, batch, hidden, proj, kernel, backward) -> the backend auto must take on an H200:
# every row of the measured table (issue #12), the cases it does not cover, and the persistent
# kernel's limits.
EXPECTED = [
    ("lstm", BF16, 16, 768, 0, "auto", True, "triton"),  # 3.85 / 12.0 vs 18.6 / 36.8 ms
    ("lstm", FP16, 16, 768, 0, "auto", True, "torch"),  # cuDNN fp16 is 1.8x faster
    ("lstm", FP32, 16, 768, 0, "auto", True, "torch"),  # 1.59x / 1.06x slower
    ("lstm", BF16, 16, 768, 384, "auto", True, "torch"),  # proj: the step kernel, 3.06x slower
    ("lstm", BF16, 64, 1024, 0, "auto", True, "triton"),
    ("lstm", BF16, 256, 512, 0, "auto", True, "triton"),
    ("lstm", BF16, 64, 512, 0, "auto", True, "triton"),  # the packed row's shape
    ("gru", BF16, 16, 768, 0, "auto", True, "triton"),
    ("rnn_tanh", BF16, 16, 768, 0, "auto", True, "triton"),
    ("rnn_relu", BF16, 16, 768, 0, "auto", True, "triton"),  # the same kernel as tanh
    ("lstm", BF16, 16, 768, 0, "step", True, "torch"),  # the forced step kernel lost
    ("lstm", BF16, 16, 768, 0, "persistent", True, "triton"),
    ("gru", FP16, 16, 768, 0, "auto", True, "torch"),  # not measured yet
    ("rnn_tanh", FP16, 16, 768, 0, "auto", True, "torch"),  # not measured yet
    ("gru", FP32, 16, 768, 0, "auto", True, "torch"),  # not measured yet
    ("lstm", torch.float64, 16, 768, 0, "auto", True, "torch"),  # no Triton kernel
    ("lstm", BF16, 16, 2048, 0, "auto", True, "torch"),  # forward not persistent
    ("lstm", BF16, 512, 512, 0, "auto", True, "torch"),  # backward not persistent ...
    ("lstm", BF16, 512, 512, 0, "auto", False, "triton"),  # ... which inference does not run
]


@pytest.fixture
def no_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test session runs Triton in its interpreter without a GPU; auto declines it there.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("cell, dtype, batch, hidden, proj, kernel, backward, want", EXPECTED)
def test_auto_follows_the_measured_table(
    cell: str, dtype: torch.dtype, batch: int, hidden: int, proj: int, kernel: str,
    backward: bool, want: str, no_interpreter: None,
) -> None:  # fmt: skip
    choice = choose_auto_backend(
        cell, CUDA, dtype, batch=batch, hidden=hidden, proj=proj, kernel=kernel,  # type: ignore[arg-type]
        backward=backward, num_sms=H200_SMS,
    )  # fmt: skip
    assert choice.backend == want, choice.reason


def test_the_table_rows_are_where_the_kernels_say() -> None:
    # A row's kernel must be the one persistent_config gives its shape on an H200, or the rule
    # would rest on rows it never reaches: persistent both ways, or (proj) not. The forced step
    # row (no proj) is the exception: it names the step kernel where the persistent one applies.
    for m in MEASURED:
        sizes = {p[0]: int(p[1:]) for p in m.shape.split() if p[0] in "BHP" and p[1:].isdigit()}
        proj = sizes.get("P", 0)
        if m.kernel == "step" and not proj:
            continue
        cell = "rnn_tanh" if m.cell == "rnn" else m.cell
        applies = all(
            persistent_config(
                sizes["B"], sizes["H"], proj or sizes["H"], m.dtype, H200_SMS, False, bwd,
                cell,  # type: ignore[arg-type]
            ) is not None
            for bwd in (False, True)
        )  # fmt: skip
        assert applies == (m.kernel == "persistent"), m


def test_auto_declines_where_no_measurement_reaches(no_interpreter: None) -> None:
    def choose(device: torch.device, **kw: object) -> AutoChoice:
        args = {"batch": 16, "hidden": 768, "num_sms": H200_SMS} | kw
        return choose_auto_backend("lstm", device, BF16, **args)  # type: ignore[arg-type]

    assert choose(torch.device("cpu")).backend == "torch"
    assert choose(torch.device("meta")).backend == "torch"
    assert choose(CUDA, one_step=True).backend == "torch"  # the cells
    assert choose(CUDA).backend == "triton"
    with pytest.raises(ValueError, match="cell must be one of"):
        choose_auto_backend("lstm2", CUDA, BF16, batch=16, hidden=768, num_sms=H200_SMS)


def test_auto_declines_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    choice = choose_auto_backend("lstm", CUDA, BF16, batch=16, hidden=768, num_sms=H200_SMS)
    assert choice.backend == "torch" and "TRITON_INTERPRET" in choice.reason


def test_the_rule_compiles_with_a_dynamic_batch(no_interpreter: None) -> None:
    # Under torch.compile the rule is traced: fullgraph, and with a dynamic batch it specialises
    # (B512 H512 backward is not persistent: torch) rather than tracing symbolic tile loops.
    def pick(x: torch.Tensor) -> torch.Tensor:
        choice = choose_auto_backend(
            "lstm", CUDA, BF16, batch=x.shape[1], hidden=512, num_sms=H200_SMS,
            backward=torch.is_grad_enabled(),
        )  # fmt: skip
        return x * 2 if choice.backend == "triton" else x * 3

    torch._dynamo.reset()
    compiled = torch.compile(pick, fullgraph=True, dynamic=True)
    for batch, factor in ((16, 2), (17, 2), (512, 3)):
        assert compiled(torch.ones(2, batch, 3))[0, 0, 0].item() == factor


@pytest.mark.parametrize(
    "make, kind, proj, one_step",
    [
        (lambda: fastpar.nn.LSTM(6, 8, proj_size=4), "lstm", 4, False),
        (lambda: fastpar.nn.GRU(6, 8), "gru", 0, False),
        (lambda: fastpar.nn.RNN(6, 8, nonlinearity="relu"), "rnn_relu", 0, False),
        (lambda: fastpar.nn.RNN(6, 8), "rnn_tanh", 0, False),
        (lambda: fastpar.nn.LSTMCell(6, 8), "lstm", 0, True),
        (lambda: fastpar.nn.GRUCell(6, 8), "gru", 0, True),
        (lambda: fastpar.nn.RNNCell(6, 8, nonlinearity="relu"), "rnn_relu", 0, True),
    ],
)
def test_modules_ask_the_rule_with_their_cell_and_sizes(
    make, kind: str, proj: int, one_step: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple] = []

    def spy(cell: str, device: torch.device, dtype: torch.dtype, **kw: object) -> AutoChoice:
        asked.append((cell, device.type, dtype, kw))
        return AutoChoice("torch", "spy")

    monkeypatch.setattr(fastpar.nn.recurrent, "choose_auto_backend", spy)
    module = make()
    x = torch.randn(5, 6) if one_step else torch.randn(3, 5, 6)  # B = 5
    module(x)
    with torch.no_grad():
        module(x)
    # Under autocast both backends run in autocast's dtype: the rule compares them there.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module(x)
    assert [a[:3] for a in asked] == [(kind, "cpu", torch.float32)] * 2 + [
        (kind, "cpu", torch.bfloat16)
    ]
    for (*_, kw), grad in zip(asked, (True, False, True), strict=True):
        assert kw == {"batch": 5, "hidden": 8, "proj": proj, "kernel": "auto",
                      "backward": grad, "one_step": one_step}  # fmt: skip


def test_the_choice_and_its_reason_are_logged_once(monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    monkeypatch.setattr(fastpar.nn.recurrent, "log_once", lambda _logger, msg: said.append(msg))
    monkeypatch.setattr(
        fastpar.nn.recurrent, "choose_auto_backend",
        lambda *a, **k: AutoChoice("torch", "float16 lstm B5 H8: cuDNN; the reason"),
    )  # fmt: skip
    fastpar.nn.LSTM(6, 8)(torch.randn(3, 5, 6))
    assert said == [
        "fastpar LSTM backend='auto' runs torch's native LSTM kernels (backend='torch'): "
        "float16 lstm B5 H8: cuDNN; the reason"
    ]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_whole_stack_packed_call_is_torchs(cell: str, bidirectional: bool) -> None:
    # What CUDA runs eagerly for packed input on torch's kernels: torch's own packed call,
    # bitwise torch's module (here on CPU; the same code).
    torch.manual_seed(0)
    theirs = getattr(torch.nn, cell.upper())(6, 8, num_layers=2, bidirectional=bidirectional)
    lengths = torch.tensor([3, 7, 1, 5])
    x = randn(7, 4, 6, seed=1).float()
    states = [randn(4 if bidirectional else 2, 4, 8, seed=s).float() for s in (2, 3)]
    states = states if cell == "lstm" else states[:1]
    hx = tuple(states) if cell == "lstm" else states[0]
    want_out, want_h = theirs(pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
    weights = [
        LayerWeights(*(getattr(theirs, f"{n}_l{k}{sfx}") for n in
                       ("weight_ih", "weight_hh", "bias_ih", "bias_hh")), None)
        for k in range(2) for sfx in ("", "_reverse")[: 1 + bidirectional]
    ]  # fmt: skip
    out, *finals = aten_common.vf_whole_stack(
        getattr(torch._VF, cell), x, states, weights, num_layers=2,
        bidirectional=bidirectional, dropout=0.0, training=False, lengths=lengths,
    )  # fmt: skip
    want_padded = torch.nn.utils.rnn.pad_packed_sequence(want_out, total_length=7)[0]
    assert torch.equal(out, want_padded)
    for got, want in zip(finals, want_h if cell == "lstm" else (want_h,), strict=True):
        assert torch.equal(got, want)


def test_eager_whole_stack_takes_torchs_packed_call_on_cuda_only() -> None:
    lengths = torch.tensor([2, 1])
    on = {d: types.SimpleNamespace(device=torch.device(d)) for d in ("cpu", "cuda")}
    assert aten_common.eager_whole_stack(on["cpu"], None)  # type: ignore[arg-type]
    assert not aten_common.eager_whole_stack(on["cpu"], lengths)  # type: ignore[arg-type]
    assert aten_common.eager_whole_stack(on["cuda"], lengths)  # type: ignore[arg-type]
    with aten_common.per_layer_ops():
        assert not aten_common.eager_whole_stack(on["cuda"], lengths)  # type: ignore[arg-type]


# --- on a GPU ---------------------------------------------------------------------------------

# (fastpar module, torch module, constructor options, dtype) where auto must take torch's kernels.
TORCH_CASES = [
    ("LSTM", {}, FP16),
    ("LSTM", {}, FP32),
    ("LSTM", {"proj_size": 24}, BF16),
    ("LSTM", {"num_layers": 2, "bidirectional": True}, FP16),
    ("GRU", {}, FP16),
    ("GRU", {"num_layers": 2, "bidirectional": True}, FP32),
    ("RNN", {}, FP16),
    ("RNN", {"nonlinearity": "relu"}, FP32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("name, options, dtype", TORCH_CASES)
def test_auto_on_cuda_is_torchs_module_where_triton_loses(
    name: str, options: dict, dtype: torch.dtype, packed: bool, monkeypatch: pytest.MonkeyPatch,
    cudnn_fp32_ieee: None,
) -> None:  # fmt: skip
    # Same weights, same input: torch's module (cuDNN) and fastpar's auto, which must run
    # torch's own call (no Triton) and so give torch's results, outputs and every gradient.
    for cell in TRITON_RECURRENCES:
        spy_triton(monkeypatch, cell, fail=True)
    said: list[str] = []
    monkeypatch.setattr(fastpar.nn.recurrent, "log_once", lambda _logger, msg: said.append(msg))
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(48, 64, **options).to("cuda", dtype)
    ours = getattr(fastpar.nn, name)(48, 64, **options).to("cuda", dtype)
    ours.load_state_dict(theirs.state_dict())
    x = randn(40, 16, 48, seed=1).to("cuda", dtype)
    lengths = torch.linspace(40, 3, 16).round().long()  # longest first
    results = []
    for model in (theirs, ours):
        leaf = x.clone().requires_grad_()
        inp = pack_padded_sequence(leaf, lengths) if packed else leaf
        out, final = model(inp)
        out = out.data if packed else out
        finals = final if isinstance(final, tuple) else (final,)
        cot = [randn(*t.shape, seed=7 + k).to(t) for k, t in enumerate((out, *finals))]
        grads = torch.autograd.grad([out, *finals], [leaf, *model.parameters()], cot)
        results.append([out, *finals, *grads])
    for k, (a, b) in enumerate(zip(*results, strict=True)):
        torch.testing.assert_close(b, a, msg=lambda m, k=k: f"result {k}: {m}")
    assert len(said) == 1 and "torch's native" in said[0] and "cuDNN" in said[0], said


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_auto_on_cuda_takes_triton_for_bfloat16_persistent(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds = spy_triton(monkeypatch, name)
    model = getattr(fastpar.nn, name)(48, 64).to("cuda", BF16)
    cell = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn_tanh"}[name]
    choice = choose_auto_backend(cell, torch.device("cuda"), BF16, batch=16, hidden=64)
    assert choice.backend == "triton", choice.reason
    out = model(randn(8, 16, 48, seed=1).to("cuda", BF16))[0]
    out.float().sum().backward()
    assert kinds == ["auto"] and torch.isfinite(out).all()
