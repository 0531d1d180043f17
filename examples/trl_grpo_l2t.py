"""Add L2T to a TRL GRPO script: ``python trl_grpo_l2t.py MODEL_DIR`` (one process), or with
``accelerate launch --config_file accelerate/ddp.yaml`` / ``accelerate/fsdp.yaml`` for several processes."""
import argparse

from datasets import Dataset

from l2t_ext.integrations.trl import L2TConfig, L2TGRPOTrainer
from l2t_ext.rl.builders import exit_process
from l2t_ext.tasks import arith

p = argparse.ArgumentParser()
p.add_argument("model_dir")  # a local Hugging Face model directory (l2t convert makes one from a .gguf)
p.add_argument("--max_steps", type=int, default=100)
p.add_argument("--cpu", action="store_true")
cli = p.parse_args()


def correct(completions, answer, **kw):  # TRL reward function: the outcome, 1.0 or 0.0
    return [float(arith.verify(c, a)) for c, a in zip(completions, answer)]


data = Dataset.from_list([{"prompt": x.prompt, "answer": x.answer} for x in arith.dataset(256, seed=0)])
args = L2TConfig(output_dir="l2t_trl_out", max_steps=cli.max_steps, per_device_train_batch_size=4,
                 num_generations=4, max_completion_length=48, learning_rate=1e-5, use_cpu=cli.cpu, bf16=not cli.cpu,
                 report_to=[], save_strategy="no", logging_steps=1, beta=0.0,
                 l2t_markers=["</think>"], l2t_answer_cue="A:", l2t_answer_prefix="", l2t_alpha=0.8, l2t_beta=0.6)
trainer = L2TGRPOTrainer(model=cli.model_dir, reward_funcs=correct, args=args, train_dataset=data)
trainer.train()  # logs l2t/episodes_mean, l2t/penalty_mean, l2t/jr_gain_mean, l2t/single_episode_share
trainer.save_model()
print(f"process {trainer.accelerator.process_index} of {trainer.accelerator.num_processes}: done")
exit_process(0)  # leave the process group with every peer, then exit (under a launcher: without finalisation)
