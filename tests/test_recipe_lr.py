"""experiments.recipe_lr's verdicts from synthetic summaries: the hypotheses can hold and can fail."""

from experiments.recipe_lr import compare


def _ms(x, std=0.01):
    return {"mean": x, "std": std, "n": 3}


def _run(rule, teacher, reach_at):
    """An eval curve over 300 updates (every 10: 31 points, 640 samples each) that jumps to 0.5 at `reach_at`."""
    samples = [640 * i for i in range(31)]
    return {"rule": rule, "teacher": teacher, "seed": 0,
            "eval": {"eval_samples": samples, "eval_reward": [0.5 if s >= reach_at else 0.1 for s in samples]}}  # fmt: skip


def _study(finals: dict[str, float], rl_final: float, reach: dict[str, int]):
    rules = {r: {"final_reward": _ms(v), "seeds": [0, 1, 2]} for r, v in finals.items()}
    runs = [_run(r, None if r == "rl_only" else "strong", reach.get(r, 10**9)) for r in finals]
    return {"summary": {"strong": {"rl_final_reward": rl_final, "rules": rules}}, "runs": runs,
            "sizes": {"steps": 300, "batch_prompts": 16, "samples_per_prompt": 4}}  # fmt: skip


def test_both_hypotheses_hold_when_the_rule_is_early_and_on_top():
    ref = _study({"rl_only": 0.28, "dense_only": 0.41, "trust_per_prompt": 0.46}, 0.28, {})
    new = _study(
        {"rl_only": 0.0, "dense_only": 0.50, "trust_per_prompt": 0.60}, 0.0, {"trust_per_prompt": 3840}
    )
    out = compare(new, ref, 5)
    assert out["H"]["held"] and out["H"]["trust_samples_to_0279"] == [3840]
    assert out["H2"]["held"] and abs(out["H2"]["per_teacher"]["strong"]["margin"] - 0.10) < 1e-12


def test_late_rule_or_a_tie_with_dense_only_fail():
    ref = _study({"rl_only": 0.28, "dense_only": 0.41, "trust_per_prompt": 0.46}, 0.28, {})
    late = _study(
        {"rl_only": 0.0, "dense_only": 0.62, "trust_per_prompt": 0.60}, 0.0, {"trust_per_prompt": 6400}
    )
    out = compare(late, ref, 5)
    assert not out["H"]["held"] and out["H"]["trust_samples_to_0279"] == [6400]  # > 4,800: missed
    assert not out["H2"]["held"] and out["H2"]["per_teacher"]["strong"]["margin"] < 0  # dense-only on top
    # RL-only gaining as much at the larger step also fails H, however early the rule is
    rl_gains = _study(
        {"rl_only": 0.5, "dense_only": 0.5, "trust_per_prompt": 0.6}, 0.5, {"trust_per_prompt": 640}
    )
    assert not compare(rl_gains, ref, 5)["H"]["held"]
