#!/usr/bin/env python
"""Lesson 11's or 12's TRL side at scale, on CUDA: sampling with vLLM, training on one or several GPUs.

    accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 2 \\
        scripts/train_online_trl.py --method grpo --vllm

One GRPO (or RLOO) run from the base policy on the arithmetic task at the ``gpu`` profile's sizes, then the
main process evaluates gold (sampled) on the held-out prompts and prints the figures: wall time, seconds per
step, and the gain. Without ``--vllm`` TRL samples with transformers' ``generate()``; with it, vLLM colocated in each
process (``rlcourse.scale.vllm_options``), the policy then in bf16 + LoRA rather than 4-bit (vLLM takes plain
weights). Each process takes ``prompts_per_step / num_processes`` prompts of every step, so the step stays the
lesson's step. Needs a CUDA machine with vLLM installed (``pip install vllm``); the course's CPU set-up has neither.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, also when it is not installed


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["grpo", "rloo"], default="grpo")
    parser.add_argument("--vllm", action="store_true", help="sample with vLLM (colocate mode)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the gpu profile's)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--out", default=None, help="output folder (default: build/scale/<method>[-vllm])")
    args = parser.parse_args(argv)

    import torch
    from accelerate import PartialState

    from rlcourse import evaluate
    from rlcourse.methods.rollouts import RolloutSettings, trl_online_config
    from rlcourse.models import LoraSettings, load_model, load_tokenizer
    from rlcourse.paths import build_dir
    from rlcourse.profiles import get_profile
    from rlcourse.sampling import SamplingSettings
    from rlcourse.scale import vllm_options
    from rlcourse.tasks import get_task
    from rlcourse.train import TrainConfig

    if not torch.cuda.is_available():
        raise SystemExit("scripts/train_online_trl.py needs CUDA; on a CPU run notebooks 11 and 12 (make course)")
    state = PartialState()
    method = importlib.import_module(f"rlcourse.methods.{args.method}")
    sizes = getattr(get_profile("gpu"), args.method)
    steps = args.steps or sizes.steps
    if sizes.prompts_per_step % state.num_processes:
        raise SystemExit(f"prompts_per_step={sizes.prompts_per_step} must divide among {state.num_processes} processes")
    per_process = RolloutSettings(num_generations=sizes.num_generations,
                                  prompts_per_step=sizes.prompts_per_step // state.num_processes,
                                  sampling=SamplingSettings(max_new_tokens=sizes.max_new_tokens))
    out = Path(args.out) if args.out else build_dir("scale", args.method + ("-vllm" if args.vllm else ""))
    task, tok = get_task("arithmetic"), load_tokenizer()
    policy = load_model(quantize=not args.vllm, lora=LoraSettings(), seed=0,
                        compute_dtype=torch.bfloat16).to(state.device)
    if args.vllm:
        policy = policy.to(torch.bfloat16)
    settings = method.Settings(**({"beta": 0.05} if args.method == "rloo" else {}))
    config = TrainConfig(steps=steps, batch_size=per_process.completions_per_step, learning_rate=sizes.learning_rate,
                         seed=0, bf16=True)
    extra = vllm_options(gpu_memory_utilization=args.gpu_memory_utilization) if args.vllm else {}
    trainer_cls, _ = method.trl_classes()
    trainer = trainer_cls(model=policy, reward_funcs=task.reward, train_dataset=task.prompts("train").shuffle(seed=0),
                          processing_class=tok, args=trl_online_config(method, settings, per_process, config, out,
                                                                     **extra))
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    figures = {"method": args.method, "vllm": args.vllm, "processes": state.num_processes, "steps": steps,
               "completions_per_step": sizes.prompts_per_step * sizes.num_generations, "train_s": round(wall, 1),
               "s_per_step": round(wall / steps, 3), "gpu": torch.cuda.get_device_name()}
    if state.is_main_process:
        prompts = task.prompts("eval").select(range(sizes.n_eval))
        sampled = SamplingSettings(max_new_tokens=sizes.max_new_tokens, do_sample=True)
        model = trainer.model
        after = evaluate.gold_eval(model, tok, task, prompts, sampled, 64, samples=sizes.eval_samples)
        before = evaluate.gold_eval(model, tok, task, prompts, sampled, 64, base=True, samples=sizes.eval_samples)
        gain, ci = evaluate.improvement(before, after)
        figures |= {"gold_base": before.mean, "gold_after": after.mean, "gain": gain, "gain_ci": ci}
        (out / "figures.json").write_text(json.dumps(figures, indent=1))
        print(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
