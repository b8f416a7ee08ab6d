"""Input validation shared by the estimators: every error names the argument and the shapes."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def shape_of(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in x.shape) + "]"


def check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(name: str, x: torch.Tensor) -> None:
    check_tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {x.dtype} {shape_of(x)}"
        )


def check_logits_pair(student: torch.Tensor, teacher: torch.Tensor, s_name: str, t_name: str) -> None:
    check_float(s_name, student)
    check_float(t_name, teacher)
    if student.dim() < 1:
        raise ValueError(f"{s_name} must have a vocabulary dimension, got shape {shape_of(student)}")
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"vocabulary mismatch: {s_name} {shape_of(student)} has V={student.shape[-1]} but "
            f"{t_name} {shape_of(teacher)} has V={teacher.shape[-1]} (student and teacher must share a tokenizer)"
        )
    if student.shape != teacher.shape:
        raise ValueError(f"shape mismatch: {s_name} {shape_of(student)} vs {t_name} {shape_of(teacher)}")
    if student.device != teacher.device:
        raise ValueError(f"device mismatch: {s_name} on {student.device}, {t_name} on {teacher.device}")
    if student.shape[-1] == 0:
        raise ValueError(f"{s_name} has an empty vocabulary: shape {shape_of(student)}")


def check_mask(
    mask: torch.Tensor | None, batch_shape: torch.Size, ref_name: str, device
) -> torch.Tensor | None:
    if mask is None:
        return None
    check_tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype} {shape_of(mask)}")
    if tuple(mask.shape) != tuple(batch_shape):
        raise ValueError(
            f"mask shape {shape_of(mask)} must equal {ref_name}'s shape without the vocabulary "
            f"dimension: [{', '.join(str(d) for d in batch_shape)}]"
        )
    if mask.device != device:
        raise ValueError(f"device mismatch: mask on {mask.device}, {ref_name} on {device}")
    return mask


def check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (t > 0.0) or t == float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return t


def check_teacher_floor(teacher_floor: float | None) -> float | None:
    """None, or a finite log-probability < 0 at which log q is clamped (log q <= 0 always: a floor >= 0 would
    lift every teacher log-prob to it and make the "KL" negative)."""
    if teacher_floor is None:
        return None
    if isinstance(teacher_floor, bool):
        raise TypeError(
            f"teacher_floor must be a number (a log-probability, e.g. -30.0) or None, got {teacher_floor!r}"
        )
    try:
        f = float(teacher_floor)
    except (TypeError, ValueError):
        raise TypeError(
            f"teacher_floor must be a number (a log-probability, e.g. -30.0) or None, got {teacher_floor!r}"
        ) from None
    if not (math.isfinite(f) and f < 0.0):
        raise ValueError(
            f"teacher_floor is a log-probability at which log q is clamped: it must be finite and < 0 "
            f"(e.g. -30.0), got {teacher_floor!r}"
        )
    return f


def describe_nonfinite(name: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> str | None:
    """Say what is wrong with `x` ([N, V]) on the given rows: NaN, +inf, or a row with no finite entry."""
    sub = x if rows is None else x[rows]
    if torch.isnan(sub).any():
        return f"{name} {shape_of(x)} contains NaN"
    if torch.isposinf(sub).any():
        return f"{name} {shape_of(x)} contains +inf (only -inf is legal: it marks a token with probability 0)"
    if sub.numel() and torch.isneginf(sub).all(dim=-1).any():
        return f"{name} {shape_of(x)} has a row whose entries are all -inf (no probability mass)"
    return None


def describe_temperature_overflow(
    student: torch.Tensor, temperature: float, rows: torch.Tensor | None = None, name: str = "student_logits"
) -> str | None:
    """Finite logits that overflow the compute dtype once divided by the temperature: name both."""
    sub = student if rows is None else student[rows]
    if not sub.numel():
        return None
    cdt = torch.float64 if student.dtype == torch.float64 else torch.float32
    peak = float(sub.detach().abs().amax().to(cdt))
    if peak / temperature < torch.finfo(cdt).max:
        return None
    return (
        f"{name} {shape_of(student)} overflow {cdt} once divided by temperature={temperature!r}: "
        f"max |logit| = {peak:.3g}, / temperature = inf. Use a larger temperature or smaller logits."
    )


def check_actions(
    actions: torch.Tensor,
    batch_shape,
    vocab: int,
    device,
    mask: torch.Tensor | None = None,
    ref: str = "logits",
) -> None:
    """Token ids: integer, shape `batch_shape`, on `device`, in [0, vocab) wherever the mask counts."""
    check_tensor("actions", actions)
    if actions.dtype.is_floating_point or actions.dtype == torch.bool or actions.is_complex():
        raise ValueError(f"actions must be an integer tensor, got {actions.dtype} {shape_of(actions)}")
    if actions.dtype not in (torch.int64, torch.int32):
        # gather/scatter index with int32 or int64 only; 8/16-bit types cannot hold a real vocabulary's ids anyway
        raise ValueError(
            f"actions must be int64 (or int32) token ids, got {actions.dtype} {shape_of(actions)}: "
            "cast them with actions.long()"
        )
    if tuple(actions.shape) != tuple(batch_shape):
        raise ValueError(
            f"actions {shape_of(actions)} must have shape [{', '.join(map(str, batch_shape))}] to match {ref}"
        )
    if actions.device != device:
        raise ValueError(f"device mismatch: actions on {actions.device}, {ref} on {device}")
    bad = (actions < 0) | (actions >= vocab)
    if mask is not None:
        bad = bad & mask
    if bad.any():
        raise ValueError(f"actions {shape_of(actions)} has ids outside [0, V={vocab}) on counted tokens")


def check_finite_vector(name: str, x: torch.Tensor, shape: tuple, device) -> None:
    check_tensor(name, x)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} {shape_of(x)} must have shape [{', '.join(map(str, shape))}]")
    if x.device != device:
        raise ValueError(f"device mismatch: {name} on {x.device}, expected {device}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} {shape_of(x)} contains NaN or inf")


def first_order_only(name: str):
    """Decorate an autograd Function's backward whose result is a closed form (not itself differentiable).

    `torch.autograd.function.once_differentiable` refuses a second derivative only when an incoming gradient
    requires grad; with `create_graph=True` and a constant upstream gradient it silently returns a backward that
    autograd treats as constant, so Hessian-vector products drop the KL's Hessian. Autograd runs a backward
    with grad mode on exactly when `create_graph=True`: refuse that, naming the function.
    """

    def wrap(backward):
        def checked(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"{name} does not support second derivatives (backward with create_graph=True, "
                    "torch.autograd.functional.hessian/hvp/jvp): its gradient is a closed form computed in the "
                    f"forward pass. Use the plain-autograd reference (e.g. dense_kl_reference) for higher-order "
                    "derivatives."
                )
            return backward(ctx, *grads)

        checked.__name__ = getattr(backward, "__name__", "backward")
        checked.__doc__ = backward.__doc__
        return checked

    return wrap
