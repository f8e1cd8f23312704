"""StepTimeModel: one step confirms a change on its own only against a noise measured over
enough steps."""

from __future__ import annotations

import random

import pytest

from fastpar.data.step_model import _TRUSTED_NOISE_STEPS, StepTimeModel

_OPTIONS = {"window": 8, "change_threshold": 0.3, "change_steps": 2, "speedup_steps": 2,
            "momentum": 0.5, "follow_at_once": True}  # fmt: skip


def _measured(rng: random.Random, noise_steps: int) -> tuple[StepTimeModel, int, float]:
    """A model after its first step and `noise_steps` more within +-1 % of it (a noise that
    small steps may show by chance under any real one); returns it, the block and the step's
    true seconds."""
    samples, seconds = rng.randint(8, 64), rng.uniform(1e-3, 1e-1)
    model = StepTimeModel()
    assert model.observe(samples, seconds, **_OPTIONS) == "first"
    for _ in range(noise_steps):
        assert model.observe(samples, seconds * rng.uniform(0.99, 1.01), **_OPTIONS) in (
            "fitted", "settled"
        )  # fmt: skip
    return model, samples, seconds


@pytest.mark.parametrize("noise_steps", [1, 2, _TRUSTED_NOISE_STEPS - 1])
def test_one_slow_step_waits_for_change_steps_while_the_noise_rests_on_few_steps(
    noise_steps: int,
) -> None:
    """A step 35-50 % slower lies beyond 4 times a noise measured on a few quiet steps, but
    such a noise is no bound yet: it stays a candidate, and a second one confirms it."""
    rng = random.Random()
    model, samples, seconds = _measured(rng, noise_steps)
    slower = seconds * rng.uniform(1.35, 1.5)
    assert model.observe(samples, slower, **_OPTIONS) == "candidate"
    assert model.observe(samples, slower, **_OPTIONS) == "changed"


def test_one_slow_step_confirms_a_slowdown_once_the_noise_is_measured() -> None:
    rng = random.Random()
    model, samples, seconds = _measured(rng, _TRUSTED_NOISE_STEPS)
    assert model.observe(samples, seconds * rng.uniform(1.35, 1.5), **_OPTIONS) == "changed"


@pytest.mark.parametrize(
    ("noise_steps", "expected"), [(1, "candidate"), (_TRUSTED_NOISE_STEPS, "returned")]
)
def test_one_fast_step_confirms_a_return_only_once_the_noise_is_measured(
    noise_steps: int, expected: str
) -> None:
    """After a confirmed 1.5-2x slowdown, one step at the previous speed returns to it at once
    only when the noise it is judged against rests on enough steps."""
    rng = random.Random()
    model, samples, seconds = _measured(rng, noise_steps)
    slower = seconds * rng.uniform(1.5, 2.0)
    model.observe(samples, slower, **{**_OPTIONS, "follow_at_once": False})
    assert model.observe(samples, slower, **_OPTIONS) == "changed"
    assert model.observe(samples, seconds, **_OPTIONS) == expected
