"""Hybrid imitation + RL inside TRL on tiny random models: CPU, no download, about half a minute.

python examples/trl_tiny.py        (or: python -m hybridlab.integrations.trl --demo)
"""

from datasets import Dataset

from hybridlab.integrations.trl import HybridGRPOConfig, HybridGRPOTrainer
from hybridlab.tasks.models import build_model, build_tokenizer
from hybridlab.tasks.toy import generate_examples, rewards

# Data: "reverse the digits" prompts ("40213=" -> "31204"); extra columns (here "answer") reach the reward.
dataset = Dataset.from_list(generate_examples("reverse", n=32, seed=0))


# Reward R: TRL calls it with the prompts, the completions' text and every dataset column.
def reverse_reward(prompts, completions, **kwargs):
    return rewards("reverse", prompts, completions, kind="partial")


# Student and teacher: causal LMs sharing one tokenizer. Tiny random Llamas here; for real models pass a local
# folder (teacher_model="path/to/teacher") and load the student with AutoModelForCausalLM.from_pretrained.
tokenizer = build_tokenizer()
student = build_model("llama", "tiny", seed=0)
teacher = build_model("llama", "small", seed=1)

# J = E[lam R] - teacher_beta KL(student || teacher), trained on GRPO's generation, groups and logging.
args = HybridGRPOConfig(
    output_dir="runs/trl_tiny",
    lam=1.0,
    teacher_beta=0.5,
    future="analytic",
    baseline="return_group",
    num_generations=4,
    per_device_train_batch_size=8,
    max_completion_length=8,
    temperature=1.0,
    learning_rate=1e-3,
    max_steps=3,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    use_cpu=True,
    bf16=False,
)
trainer = HybridGRPOTrainer(
    model=student,
    teacher_model=teacher,
    reward_funcs=reverse_reward,
    args=args,
    train_dataset=dataset,
    processing_class=tokenizer,
)
trainer.train()
