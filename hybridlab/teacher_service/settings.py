"""The teacher-source settings of `TrainConfig` (teacher_url, teacher_token_file, teacher_timeout, teacher_retries,
teacher_topk), checked here; imports neither torch nor transformers, like `hybridlab.train.config`."""

from __future__ import annotations

import math


def check_teacher_settings(cfg, given: tuple[str, ...] = ()) -> None:
    """`TrainConfig.validate`'s checks of the teacher's source: a folder (or a model handed over: `given`) or a
    server (`teacher_url`), the client's settings, and what a served or top-k teacher cannot do."""
    if cfg.teacher_url:
        if cfg.teacher or "teacher" in given:
            raise ValueError(f"give the teacher as a folder (teacher={cfg.teacher!r}) or a server "
                             f"(teacher_url={cfg.teacher_url!r}), not both")  # fmt: skip
        if not cfg.teacher_url.startswith(("http://", "https://")):
            raise ValueError(f"teacher_url must be an http:// or https:// URL, got {cfg.teacher_url!r}")
        if cfg.loss == "sft" or cfg.teacher_trust != "none":
            raise ValueError("loss='sft' and teacher_trust sample from the teacher, which a served teacher does "
                             f"not do (it only scores): got loss={cfg.loss!r}, teacher_trust="
                             f"{cfg.teacher_trust!r} with teacher_url")  # fmt: skip
    elif cfg.teacher_token_file:
        raise ValueError("teacher_token_file is set without teacher_url")
    if not (cfg.teacher_timeout > 0 and math.isfinite(cfg.teacher_timeout)):
        raise ValueError(f"teacher_timeout must be a positive number of seconds, got {cfg.teacher_timeout}")
    if cfg.teacher_retries < 0:
        raise ValueError(f"teacher_retries must be >= 0, got {cfg.teacher_retries!r}")
    if cfg.teacher_topk is not None:
        if cfg.teacher_topk < 1:
            raise ValueError(f"teacher_topk must be >= 1, got {cfg.teacher_topk!r}")
        if not cfg.fused_linear or cfg.loss != "hybrid" or cfg.future in ("k1", "k3"):
            raise ValueError(
                "teacher_topk needs loss='hybrid', fused_linear=true and future 'analytic' or 'none' (the top-k "
                f"teacher lacks log-probs outside its top-k); got loss={cfg.loss!r}, fused_linear="
                f"{cfg.fused_linear}, future={cfg.future!r}"
            )
