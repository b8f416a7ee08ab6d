"""`hybridlab.train`: config parsing and errors, rewards, vocabulary checks, an end-to-end smoke run, resume,
and the fused-linear path against materialised logits. Tiny random Llama / Qwen2 models, built locally."""

import json
import math

import pytest
import torch
import yaml

from hybridlab.lab.memory import fused_bytes, logits_memory_table, materialised_bytes, saved_tensor_bytes
from hybridlab.scripts.make_tiny_models import make_tiny_models
from hybridlab.tasks.rewards import call_reward, exact_match, load_reward
from hybridlab.train import (
    PromptOrder,
    TrainConfig,
    Trainer,
    load_config,
    load_prompts,
    main,
    make_scheduler,
    response_logits,
    response_mask,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return make_tiny_models(root, ("llama", "qwen2"), hidden=32, layers=1, n_prompts=32)


def _cfg(tiny, tmp_path, arch="llama", **kw) -> TrainConfig:
    base = dict(
        student=str(tiny[arch]["student"]), teacher=str(tiny[arch]["teacher"]), tokenizer=str(tiny["tokenizer"]["path"]),
        prompts=str(tiny["prompts"]["path"]), reward="hybridlab.tasks.rewards:reverse", lr=3e-3, warmup_steps=2,
        steps=4, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=6, grad_accum=2, bf16=False,
        dense_backend="torch", output_dir=str(tmp_path / "run"), progress=False, cpu=True, cpu_threads=1, seed=0,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base).validate()


# ------------------------------------------------------------------------------------------ config
def test_config_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        yaml.safe_dump({"student": "s", "teacher": "t", "prompts": "p.jsonl", "lr": 1e-4, "steps": 7})
    )
    cfg = load_config(p, ["--lr", "1e-5", "--bf16", "false", "--teacher_floor", "-30", "--normalize", "2",
                          "--output_dir", "runs/x"])  # fmt: skip
    assert cfg.lr == 1e-5 and isinstance(cfg.lr, float)
    assert cfg.bf16 is False and cfg.teacher_floor == -30.0 and cfg.steps == 7
    assert cfg.normalize_value == 2.0 and isinstance(cfg.normalize_value, float)
    assert load_config(p, ["--normalize", "tokens"]).normalize_value == "tokens"
    assert load_config(p).teacher_floor is None
    neg = load_config(p, ["--teacher_floor", "-1e-3", "--teacher_prompt", "null", "--gamma", "0.5"])
    # negative values; `null` unsets a text key
    assert neg.teacher_floor == -1e-3 and neg.teacher_prompt is None
    assert load_config(p, ["--teacher_prompt", "a {prompt}"]).teacher_prompt == "a {prompt}"
    c = load_config(p, ["--reward", "my.mod:fn", "--max-prompt-tokens", "512"])  # dashes work too
    assert (c.reward, c.max_prompt_tokens) == ("my.mod:fn", 512)
    p.write_text(
        "student: s\nteacher: t\nprompts: p.jsonl\nlr: 1e-5\nsteps: 7\n"
    )  # YAML 1.1: "1e-5" is a string
    assert load_config(p).lr == 1e-5
    # presets sit under the YAML file and the flags
    r = load_config(p, ["--lam", "3"], preset="rl_only")
    assert (r.beta, r.lam, r.baseline, r.future) == (0.0, 3.0, "reward_group", "none")
    assert load_config(p, ["--beta", "0.5"], preset="rl_only").beta == 0.5
    # the shipped configs parse
    for name in ("tiny_cpu", "example_gpu", "real_cpu", "real_gpu"):
        c = load_config(f"configs/{name}.yaml")
        assert c.steps > 0 and c.reward


def test_config_paths_follow_the_environment(tmp_path, monkeypatch):
    """real_cpu.yaml's models live where `make real-model` puts them: $HYBRIDLAB_MODELS, else runs/models."""
    monkeypatch.delenv("HYBRIDLAB_MODELS", raising=False)
    assert load_config("configs/real_cpu.yaml").student == "runs/models/smollm2-135m-instruct"
    monkeypatch.setenv("HYBRIDLAB_MODELS", str(tmp_path / "models"))
    c = load_config("configs/real_cpu.yaml")
    assert c.student == c.teacher == str(tmp_path / "models" / "smollm2-135m-instruct")
    p = tmp_path / "c.yaml"
    p.write_text(
        "student: ${NO_SUCH_VAR_HL}/s\nteacher: t\nprompts: p.jsonl\nteacher_prompt: '$x {prompt}'\n"
    )
    with pytest.raises(ValueError, match=r"NO_SUCH_VAR_HL"):
        load_config(p)
    p.write_text("student: s\nteacher: t\nprompts: p.jsonl\nreward: 'm${HYBRIDLAB_MODELS}:f'\n")
    assert load_config(p).reward == "m${HYBRIDLAB_MODELS}:f"  # only paths are expanded


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["--lamda", "0.5"], ["lamda", "did you mean", "'lam'"]),
        (["--stpes", "3"], ["stpes", "did you mean", "'steps'"]),
        (["--gamma", "1.5"], ["gamma", "1.5"]),
        (["--future", "k2"], ["future", "'k2'", "analytic"]),
        (["--normalize", "mean"], ["normalize", "'mean'"]),
        (["--normalize", "-1"], ["normalize", "-1"]),
        (["--lr", "fast"], ["lr", "'fast'", "float"]),
        (["--lr", "-1e-3"], ["lr must be > 0", "-0.001"]),
        (["--bf16", "maybe"], ["bf16", "maybe"]),
        (["--steps", "0"], ["steps", "0"]),
        (["--steps", "2.5"], ["steps", "2.5", "int"]),
        (["--samples_per_prompt", "1"], ["samples_per_prompt", "return_group"]),
        (["--grad_accum", "3"], ["prompts_per_step=8", "grad_accum=3"]),
        (["--group_size", "3"], ["group_size=3", "samples_per_prompt=4"]),
        (["--temperature", "0"], ["temperature", "0"]),
        (["--teacher_floor", "5"], ["teacher_floor", "5"]),
        (["--student", ""], ["student"]),
        (["--teacher_prompt", "no field"], ["teacher_prompt", "{prompt}"]),
        (["--loss", "sft", "--fused_linear", "true"], ["fused_linear", "sft"]),
        (["lr=1e-5"], ["--lr 1e-5"]),
    ],
)
def test_config_bad_values_name_the_key(tmp_path, overrides, words):
    p = tmp_path / "c.yaml"
    p.write_text("student: s\nteacher: t\nprompts: p.jsonl\n")
    with pytest.raises(ValueError) as e:
        load_config(p, overrides)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(p)
    p.write_text("student: s\nlamda: 1\n")
    with pytest.raises(ValueError, match="unknown config .* key 'lamda'; did you mean 'lam'"):
        load_config(p)


def test_cli_answers_before_loading_torch(tmp_path):
    """A typo costs no torch / transformers import: the arguments are checked first."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom hybridlab.train import parse_args\n"
        "try:\n    parse_args(['--stpes', '3'])\nexcept ValueError as e:\n    print(e)\n"
        "print('torch' in sys.modules, 'transformers.modeling_utils' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "did you mean 'steps'?" in out and out.strip().endswith("False False"), out


def test_loader_constants_match_the_loss():
    from hybridlab.hybrid import NORMALIZATIONS
    from hybridlab.sparse import FUTURE_ESTIMATORS
    from hybridlab.train.config import Future

    assert set(FUTURE_ESTIMATORS) == set(Future.__args__)
    assert tuple(NORMALIZATIONS) == tuple(__import__("hybridlab.train.config").train.config.NORMALIZATIONS)


def test_prompts_file_errors(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "12=", "answer": "21"}\n\n{"prompt": "3="}\n')
    assert load_prompts(p) == [{"prompt": "12=", "answer": "21"}, {"prompt": "3=", "answer": None}]
    p.write_text('{"prompt": "12="}\n{"prompt": 5}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2"):
        load_prompts(p)
    p.write_text('{"prompt": "12="}\nnot json\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not valid JSON"):
        load_prompts(p)
    with pytest.raises(ValueError, match="is a folder: give a JSONL file"):
        load_prompts(tmp_path)


def test_schedule_order_and_mask():
    cfg = TrainConfig(
        student="s", teacher="t", prompts="p", lr=1.0, steps=10, warmup_steps=2, min_lr_ratio=0.1
    )
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, cfg)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[-1] == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8))
    )
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # monotone decay after warmup
    o1, o2 = PromptOrder(5, seed=3), PromptOrder(5, seed=3)
    first = o1.take(7)
    assert sorted(first[:5]) == list(range(5))  # an epoch is a permutation
    o2.load_state_dict({"n": 5, "seed": 3, "consumed": 4})
    assert o2.take(3) == first[4:7]
    with pytest.raises(ValueError, match="same prompts file and seed"):
        o2.load_state_dict({"n": 6, "seed": 3, "consumed": 0})
    toks = torch.tensor([[5, 2, 7, 7], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert response_mask(toks, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


# ----------------------------------------------------------------------------------------- rewards
def test_reward_dotted_paths_and_errors():
    assert load_reward("hybridlab.tasks.rewards:exact_match") is exact_match
    assert load_reward("hybridlab.tasks.rewards.exact_match") is exact_match
    rev = load_reward("hybridlab.tasks.rewards:reverse")
    assert rev(["123=", "45="], ["321", "45"], [None, None]) == [1.0, 0.0]
    assert load_reward("hybridlab.tasks.rewards:add_partial")(["1+2="], ["3"], [None]) == [1.0]
    assert exact_match(["q"], [" 42 "], ["42"]) == [1.0]
    with pytest.raises(ValueError, match="needs an 'answer'"):
        exact_match(["q"], ["42"], [None])
    for spec, msg in [
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("hybridlab.tasks.rewards:nope", "has no attribute 'nope'"),
        ("hybridlab.tasks.rewards:__doc__", "not a callable"),
        ("exact_match", "module:function"),
        ("", "dotted path"),
    ]:
        with pytest.raises(ValueError, match=msg):
            load_reward(spec)
    with pytest.raises(ValueError, match="returned 1 values for 2 responses"):
        call_reward(lambda p, r, a: [1.0], ["a", "b"], ["x", "y"], [None, None])
    with pytest.raises(ValueError, match="NaN or inf"):
        call_reward(lambda p, r, a: [float("nan")], ["a"], ["x"], [None])


# ------------------------------------------------------------------------------------ vocabularies
def test_vocab_mismatch_is_a_clear_error(tiny, tmp_path):
    from hybridlab.scripts.make_tiny_models import make_model
    from hybridlab.tasks.models import build_tokenizer, save_model_dir

    v = len(build_tokenizer())
    small = save_model_dir(make_model("llama", v - 3, 0), build_tokenizer(), tmp_path / "small_teacher")
    with pytest.raises(ValueError) as e:
        Trainer(_cfg(tiny, tmp_path, teacher=str(small)))
    msg = str(e.value)
    assert f"vocab_size={v}" in msg and f"vocab_size={v - 3}" in msg
    assert str(tiny["llama"]["student"]) in msg and str(small) in msg


def test_missing_model_folder_is_named(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_student"):
        Trainer(_cfg(tiny, tmp_path, student=str(tmp_path / "no_such_student")))


def test_a_tokenizer_folder_as_student_names_the_key(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"student .*tokenizer.* no config.json"):
        Trainer(_cfg(tiny, tmp_path, student=str(tiny["tokenizer"]["path"])))


def test_padded_teacher_is_sliced(tiny, tmp_path):
    padded = make_tiny_models(
        tmp_path / "padded", ("llama",), hidden=32, layers=1, n_prompts=8, teacher_vocab_pad=5
    )
    cfg = _cfg(tiny, tmp_path, teacher=str(padded["llama"]["teacher"]), steps=1)
    tr = Trainer(cfg)
    assert tr.teacher.get_output_embeddings().weight.shape[0] == tr.vocab + 5
    m = tr.train_step()
    assert math.isfinite(m["loss"]) and m["kl"] > 0


# ------------------------------------------------------------------------------------ end to end
def test_smoke_run_writes_metrics_checkpoints_and_model(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tiny, tmp_path, arch="qwen2", checkpoint_every=2, steps=4)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({k: v for k, v in cfg.__dict__.items()}))
    summary = main(["--config", str(p), "--tensorboard", "true"])  # the CLI, in-process
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for k in ("loss", "dense", "sparse", "kl", "reward", "grad_norm", "lr", "tokens", "tokens_per_s"):
            assert math.isfinite(r[k]), (k, r)
        assert r["kl"] > 0 and r["tokens"] > 0
    assert rows[0]["lr"] < rows[1]["lr"]  # warmup
    assert sorted(d.name for d in (run / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 4 == summary["steps"]
    assert summary["complete"] and summary["tokens_per_s"] > 0
    assert load_config(run / "config.yaml").student == cfg.student
    final = AutoModelForCausalLM.from_pretrained(run / "final", use_safetensors=True)
    assert final.config.model_type == "qwen2"
    with pytest.raises(ValueError, match="already has checkpoints"):  # never silently overwrites a run
        main(["--config", str(p)])
    # --resume of a finished run says so and trains nothing
    again = main(["--config", str(p), "--resume"])
    assert again["steps"] == 4 and again["complete"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4


def test_resume_continues_to_the_same_result(tiny, tmp_path):
    straight, s1 = _run(tiny, tmp_path / "a", steps=4, checkpoint_every=2, keep_checkpoints=1)
    params_2 = None
    interrupted, s2 = _run(tiny, tmp_path / "b", steps=4, stop_after=2)
    assert not s2["complete"] and s2["steps"] == 2 and s2["final_model"] is None
    params_2 = {k: v.clone() for k, v in interrupted.model.state_dict().items()}
    stale = tmp_path / "b" / "checkpoints" / ".step-00000003.tmp-999"  # a kill during a checkpoint write
    stale.mkdir()
    resumed, s3 = _run(tiny, tmp_path / "b", steps=4, resume=True)
    assert s3["steps"] == 4 and s3["steps_this_run"] == 2 and s3["complete"]
    assert not stale.exists()  # cleaned on resume
    assert s1["checkpoints"] == [
        str(tmp_path / "a" / "checkpoints" / "step-00000004")
    ]  # step 2 was rotated out
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical on CPU
    assert any(not torch.equal(a[k], params_2[k]) for k in a)  # and steps 3-4 did change the weights
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rs]  # drop timings
    ma = strip(json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
    mb = strip(json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())
    assert ma == mb and len(ma) == 4


def _run(tiny, out, resume=False, **kw):
    from hybridlab.train.loop import run

    cfg = _cfg(tiny, out, output_dir=str(out), **kw)
    return run(cfg, resume=resume)


# --------------------------------------------------------------------------- fused vs materialised
@pytest.mark.parametrize("arch, future", [("llama", "analytic"), ("qwen2", "k3")])
def test_fused_linear_matches_materialised_gradients(tiny, tmp_path, arch, future):
    ref = Trainer(_cfg(tiny, tmp_path, arch=arch, future=future, fused_linear=False))
    ros = ref.generate()
    # alignment: row t of the teacher's logits produced response token t (trainer.response_logits convention)
    assert torch.allclose(
        ref.teacher_inputs(ros[0]), response_logits(ref.teacher, ros[0], teacher=True), atol=1e-6
    )
    m_ref = ref.train_step(rollouts=ros, keep_grads=True)
    fused = Trainer(_cfg(tiny, tmp_path, arch=arch, future=future, fused_linear=True, fused_chunk=5))
    m_fused = fused.train_step(rollouts=ros, keep_grads=True)
    assert m_fused["loss"] == pytest.approx(m_ref["loss"], rel=1e-5, abs=1e-6)
    assert m_fused["kl"] == pytest.approx(m_ref["kl"], rel=1e-5)
    ga = {n: p.grad for n, p in ref.model.named_parameters()}
    gb = {n: p.grad for n, p in fused.model.named_parameters()}
    scale = max(float(g.abs().max()) for g in ga.values())
    assert scale > 0
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-4, atol=1e-5 * scale), n


# ------------------------------------------------------------------------------------------ memory
def test_memory_table_and_saved_bytes():
    n, v, h = 8192, 152064, 3584
    rows = {r["what"]: r for r in logits_memory_table(n, v, h)}
    assert rows["one [N, V] tensor, bf16"]["bytes"] == n * v * 2
    assert rows["one [N, V] tensor, fp32"]["bytes"] == n * v * 4
    mat = sum(materialised_bytes(n, v).values())
    assert mat == 3 * n * v * 2  # logits, their gradient, teacher logits (bf16)
    fus = sum(fused_bytes(n, v, h).values())
    assert fus < mat and fus == sum(fused_bytes(4 * n, v, h).values())  # independent of N
    # measured: bytes autograd keeps for backward at a small size (the fused path keeps no [N, V] buffer)
    from hybridlab.fused_hybrid import fused_hybrid_loss
    from hybridlab.hybrid import hybrid_loss

    torch.manual_seed(0)
    b, t, hd, vv = 4, 32, 16, 2048
    hid = torch.randn(b, t, hd, requires_grad=True)
    w = torch.randn(vv, hd, requires_grad=True)
    teacher = (torch.randn(b, t, hd), torch.randn(vv, hd))
    a, r = torch.randint(0, vv, (b, t)), torch.rand(b)
    kw = {"baseline": "return_group", "group_size": 2, "backend": "torch"}
    mat_saved, _ = saved_tensor_bytes(
        lambda: hybrid_loss(hid @ w.t(), teacher[0] @ teacher[1].t(), a, r, **kw), exclude=[hid, w, *teacher]
    )
    fus_saved, _ = saved_tensor_bytes(
        lambda: fused_hybrid_loss(hid, w, teacher, a, r, chunk_size=16, **kw), exclude=[hid, w, *teacher]
    )
    nv = b * t * vv * 4
    assert mat_saved >= 2 * nv  # logits + the closed-form gradient buffer, fp32
    assert fus_saved < nv / 50  # per-row statistics only


def test_teacher_with_another_tokenizer_is_refused(tiny, tmp_path):
    from hybridlab.tasks.models import build_tokenizer

    other = tmp_path / "teacher_other_tok"
    import shutil

    shutil.copytree(tiny["llama"]["teacher"], other)
    build_tokenizer("9876543210+=").save_pretrained(other)  # same size, different ids
    with pytest.raises(ValueError, match="tokenizer mismatch") as e:
        Trainer(_cfg(tiny, tmp_path, teacher=str(other)))
    assert str(other) in str(e.value)


def test_gradient_checkpointing_gives_the_same_gradients(tiny, tmp_path):
    ref = Trainer(_cfg(tiny, tmp_path))
    ros = ref.generate()
    ref.train_step(rollouts=ros, keep_grads=True)
    gc = Trainer(_cfg(tiny, tmp_path, gradient_checkpointing=True))
    flag = (
        "is_activation_checkpointing"
        if hasattr(gc.model, "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    assert getattr(gc.model, flag) and not getattr(ref.model, flag)
    gc.train_step(rollouts=ros, keep_grads=True)
    for (n, a), (_, b) in zip(ref.model.named_parameters(), gc.model.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), n


def test_bf16_autocast_paths(tiny, tmp_path):
    """The CUDA bf16 set-up (fp32 master weights under bf16 autocast, bf16 teacher), run on CPU autocast: both
    loss paths run, cast consistently, and agree to bf16 precision."""
    from hybridlab.train.loop import coefficients

    tr = Trainer(_cfg(tiny, tmp_path))
    ros = tr.generate()
    tr.teacher.to(torch.bfloat16)
    grads = {}
    for fused in (False, True):
        tr.cfg.fused_linear = fused
        tr.optimizer.zero_grad(set_to_none=True)
        for ro in ros:
            c = coefficients(tr.cfg.normalize_value, ro.mask, ro.keep, 8.0, 1.0)
            t_in = tr.teacher_inputs(ro)
            assert (t_in[0] if fused else t_in).dtype == torch.bfloat16
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = tr.policy(
                    mode="loss", input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                    position_ids=ro.position_ids, prompt_len=ro.prompt_len, actions=ro.actions, mask=ro.mask,
                    rewards=ro.rewards, seq_weights=c, teacher=t_in, loss_kw=tr.loss_kw, fused=fused, chunk=7,
                )  # fmt: skip
            out["loss"].backward()
        grads[fused] = {n: p.grad.clone() for n, p in tr.model.named_parameters()}
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads[fused].values())
    flat = [torch.cat([g.flatten() for g in grads[f].values()]) for f in (False, True)]
    cos = torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0)
    assert cos > 0.99 and (flat[0] - flat[1]).norm() < 0.1 * flat[0].norm()


def test_resume_refuses_a_changed_config():
    from hybridlab.train.checkpoint import check_same_run

    saved = {"lam": 1.0, "beta": 1.0, "progress": True}
    check_same_run(saved, {"lam": 1.0, "beta": 1.0, "progress": False}, "ck")  # display-only keys may change
    with pytest.raises(ValueError, match=r"lam: 1.0 -> 2.0"):
        check_same_run(saved, {"lam": 2.0, "beta": 1.0, "progress": True}, "ck")


def test_a_non_finite_gradient_is_refused_before_the_update(tiny, tmp_path):
    tr = Trainer(_cfg(tiny, tmp_path))
    before = [p.detach().clone() for p in tr.model.parameters()]
    ro = tr.generate()
    next(tr.model.parameters()).register_hook(lambda g: g * float("nan"))  # e.g. an overflow upstream
    with pytest.raises(FloatingPointError, match="update was not applied"):
        tr.train_step(ro)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, tr.model.parameters()))


def test_the_fused_path_validates_each_input_once(monkeypatch):
    """fused_hybrid_loss checks its inputs at its boundary; the fused KL and log-prob internals trust it."""
    from collections import Counter

    import hybridlab._checks as checks
    import hybridlab.fused_hybrid as fh
    import hybridlab.fused_linear as fl

    seen = Counter()
    real = checks.check_float

    def counting(name, x):
        seen[name] += 1
        return real(name, x)

    for mod in (fh, fl):
        monkeypatch.setattr(mod, "check_float", counting)
    torch.manual_seed(0)
    hid, w = torch.randn(2, 3, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    teacher = (torch.randn(2, 3, 8), torch.randn(11, 8))
    out = fh.fused_hybrid_loss(hid, w, teacher, torch.randint(0, 11, (2, 3)), torch.rand(2), chunk_size=4,
                               backend="torch")  # fmt: skip
    out.loss.backward()
    assert seen["hidden"] == 1 and seen["weight"] == 1 and seen["teacher_hidden"] == 1, seen
    with pytest.raises(ValueError, match=r"teacher_hidden \[2, 3, 8\] and teacher_weight \[10, 8\]"):
        fh.fused_hybrid_loss(
            hid, w, (teacher[0], teacher[1][:10]), torch.zeros(2, 3, dtype=torch.long), torch.rand(2)
        )


# ------------------------------------------------------------------ interrupted runs lose no finished work
def _untimed_rows(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]


def _weights_equal(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("error, saved_step", [(ValueError, 3), (KeyboardInterrupt, 2)],
                         ids=["nan-reward-in-step-4", "ctrl-c-in-step-3"])  # fmt: skip
def test_an_error_or_ctrl_c_saves_the_finished_steps_and_resume_is_exact(tiny, tmp_path, error, saved_step):
    """checkpoint_every=0: a reward returning NaN in step 4 (or Ctrl-C in step 3) saves the state after the last
    finished step, with the data order rewound to it, and says where; --resume then ends exactly where an
    uninterrupted run ends (weights bit-identical, metrics equal). The start-of-run evaluation is a metrics row."""
    rev = load_reward("hybridlab.tasks.rewards:reverse")
    evaluating = [False]

    def failing(prompts, responses, answers):  # in the first micro-batch of step saved_step + 1
        if tr.step == saved_step and not evaluating[0]:
            if error is KeyboardInterrupt:
                raise KeyboardInterrupt
            return [float("nan")] * len(prompts)
        return rev(prompts, responses, answers)

    def evaluate():
        evaluating[0] = True
        try:
            return Trainer.evaluate(tr)
        finally:
            evaluating[0] = False

    kw = dict(steps=6, eval_prompts=str(tiny["prompts"]["path"]), eval_count=2, eval_every=3)
    straight = Trainer(_cfg(tiny, tmp_path / "a", output_dir=str(tmp_path / "a"), **kw), reward=rev)
    straight.train()
    cfg = _cfg(tiny, tmp_path / "b", output_dir=str(tmp_path / "b"), **kw)
    tr = Trainer(cfg, reward=failing)
    tr.evaluate = evaluate
    with pytest.raises(error) as e:
        tr.train()
    ck = tmp_path / "b" / "checkpoints" / f"step-{saved_step:08d}"
    assert ck.is_dir()
    assert f"saved the state after step {saved_step} to {ck}" in " ".join(getattr(e.value, "__notes__", []))
    again = Trainer(cfg, reward=rev)
    assert again.resume() and again.step == saved_step
    assert again.order.consumed == saved_step * cfg.prompts_per_step  # rewound before the failing step
    again.train()
    assert again.step == 6 and _weights_equal(again, straight)
    rows = _untimed_rows(tmp_path / "b")
    assert rows == _untimed_rows(tmp_path / "a") and [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert "eval_greedy_acc" in rows[0] and "loss" not in rows[0]  # the start-of-run evaluation


def test_final_is_atomic_and_resume_finishes_a_run_killed_at_its_end(tiny, tmp_path):
    from hybridlab.train.checkpoint import final_is_complete
    from hybridlab.train.loop import run

    out = tmp_path / "run"
    cfg = _cfg(tiny, tmp_path, steps=2)
    tr = Trainer(cfg)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    tr.tokenizer.save_pretrained = full_disk  # fails after the weights of final/ are written
    with pytest.raises(OSError):
        tr.train()
    assert not (out / "final").exists() and not (out / "summary.json").exists()  # no partial final/
    assert (out / "checkpoints" / "step-00000002").is_dir()
    _, s = run(cfg, resume=True)  # the last checkpoint is the last step: finish the run
    assert (
        s["complete"]
        and final_is_complete(out / "final")
        and json.loads((out / "summary.json").read_text())["complete"]
    )
    assert not list(out.glob(".final.*"))  # the interrupted write's leftovers are gone
    for kill in ("no final", "partial final", "no summary"):  # a kill at each point of the run's end
        if kill == "no final":
            import shutil

            shutil.rmtree(out / "final")
        elif kill == "partial final":
            (out / "final" / "model.safetensors").unlink()
        else:
            (out / "summary.json").unlink()
        assert not (final_is_complete(out / "final") and (out / "summary.json").exists())
        _, s = run(cfg, resume=True)
        assert s["complete"] and final_is_complete(out / "final"), kill
        assert json.loads((out / "summary.json").read_text())["complete"], kill
    assert [r["step"] for r in _untimed_rows(out)] == [1, 2]  # finishing trained nothing more
    _, s = run(cfg, resume=True)  # now really complete: nothing to do, same summary
    assert s == json.loads((out / "summary.json").read_text())


def test_a_corrupt_newest_checkpoint_is_skipped_for_the_older_one(tiny, tmp_path):
    from hybridlab.train.loop import run

    straight, _ = _run(tiny, tmp_path / "a", steps=3)
    _run(tiny, tmp_path / "b", steps=3, stop_after=2, checkpoint_every=1)
    (tmp_path / "b" / "checkpoints" / "step-00000002" / "model.safetensors").write_bytes(b"\0garbage" * 10)
    resumed, s = run(
        _cfg(tiny, tmp_path, output_dir=str(tmp_path / "b"), steps=3, checkpoint_every=1), resume=True
    )
    assert s["steps_this_run"] == 2 and s["complete"]  # from step 1
    assert _weights_equal(resumed, straight)
    # none readable: an error naming the folder, not a traceback
    for name in ("model.safetensors", "state.pt"):
        for ck in (tmp_path / "b" / "checkpoints").glob("step-*"):
            (ck / name).write_bytes(b"\0garbage")
    with pytest.raises(ValueError, match="no checkpoint in .* can be read"):
        run(_cfg(tiny, tmp_path, output_dir=str(tmp_path / "b"), steps=3), resume=True)


def test_user_errors_on_the_command_line_are_one_line(tiny, tmp_path, capsys, monkeypatch):
    import transformers

    from hybridlab.train import cli

    base = ["--student", str(tiny["llama"]["student"]), "--teacher", str(tiny["llama"]["teacher"]),
            "--tokenizer", str(tiny["tokenizer"]["path"]), "--prompts", str(tiny["prompts"]["path"]),
            "--reward", "hybridlab.tasks.rewards:reverse", "--steps", "1", "--prompts_per_step", "2",
            "--samples_per_prompt", "2", "--max_new_tokens", "4", "--bf16", "false", "--cpu", "true",
            "--progress", "false", "--output_dir", str(tmp_path / "run")]  # fmt: skip

    def offline(*a, **k):  # what transformers raises for a hub name without network
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    cases = [(["--student", "org/name"], "student 'org/name'"), (["--prompts", str(tmp_path)], "is a folder"),
             (["--lr", "-1e-3"], "lr must be > 0, got -0.001")]  # fmt: skip
    for extra, words in cases:
        with monkeypatch.context() as m:
            m.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
            assert cli(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (extra, err)
    import hybridlab.train.checkpoint as ck

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_model", full_disk)
    assert cli(base) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err, err
    assert "hybridlab.train: error: OSError" in err
