"""The online lessons at scale, on CUDA: TRL's side generating with vLLM and training on several GPUs.

On a CPU the course samples with its own rollout engine (``rlcourse.rollout_engine``); on GPUs TRL's trainers can
hand generation to vLLM in the same process (``vllm_mode="colocate"``: vLLM and the trainer share each GPU, the
LoRA-merged weights are copied into vLLM after each optimizer step) and run data-parallel under
``accelerate launch``. ``scripts/train_online_trl.py`` runs lesson 11's or 12's TRL side that way:

    accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 2 \\
        scripts/train_online_trl.py --method grpo --vllm

vLLM loads plain weights: with it the policy is SmolLM2 in bf16 + LoRA, not 4-bit (TRL merges the adapters into
the weights it sends to vLLM, which a 4-bit base cannot take). Its samples come from another copy of the weights
in another kernel, so TRL corrects the off-policy gap with truncated importance weights (``losses.off_policy``).
"""

from __future__ import annotations

from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
"""The accelerate launch configurations: ``single_gpu.yaml``, ``multi_gpu.yaml``."""


def vllm_options(mode: str = "colocate", gpu_memory_utilization: float = 0.3, max_model_length: int = 1024,
                 sleep: bool = False) -> dict:
    """The GRPOConfig / RLOOConfig options that make TRL sample with vLLM.

    mode: "colocate" (vLLM inside each training process, sharing its GPU) or "server" (a separate ``trl vllm-serve``
    on other GPUs). gpu_memory_utilization: the share of each GPU vLLM may take in colocate mode (the trainer
    keeps the rest). max_model_length: prompt + completion tokens vLLM reserves its cache for. sleep: release vLLM's
    memory while the trainer trains (slower, for tight GPUs).
    """
    if mode not in ("colocate", "server"):
        raise ValueError(f"mode={mode!r}; choose 'colocate' or 'server'")
    if not 0 < gpu_memory_utilization < 1:
        raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization}: a share of the GPU, between 0 and 1")
    return dict(use_vllm=True, vllm_mode=mode, vllm_gpu_memory_utilization=gpu_memory_utilization,
                vllm_max_model_length=max_model_length, vllm_enable_sleep_mode=sleep)


def accelerate_config(name: str = "multi_gpu"):
    """The accelerate ``ClusterConfig`` of ``configs/accelerate/<name>.yaml``, parsed and checked by accelerate."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / f"{name}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
        raise FileNotFoundError(f"{path} does not exist; the configurations are {names}")
    return load_config_from_file(str(path))
