"""The at-scale path's configurations are valid on any machine: accelerate parses the launch files, and TRL's
online configs accept the vLLM options with the lessons' settings (running them needs CUDA and vLLM)."""

import importlib.util
from pathlib import Path

import pytest

from rlcourse.methods import grpo, rloo
from rlcourse.methods.rollouts import RolloutSettings, trl_online_config
from rlcourse.scale import CONFIGS, accelerate_config, vllm_options
from rlcourse.train import TrainConfig


@pytest.mark.parametrize("name, distributed, processes", [("single_gpu", "NO", 1), ("multi_gpu", "MULTI_GPU", 2)])
def test_accelerate_configs_parse(name, distributed, processes):
    config = accelerate_config(name)
    assert str(config.distributed_type).rsplit(".", 1)[-1] == distributed
    assert config.num_processes == processes and config.mixed_precision == "bf16" and not config.use_cpu


def test_an_unknown_config_names_the_ones_there_are():
    with pytest.raises(FileNotFoundError, match="multi_gpu"):
        accelerate_config("eight_gpus")
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == {"single_gpu", "multi_gpu"}


@pytest.mark.parametrize("method", [grpo, rloo])
def test_trl_online_configs_take_the_vllm_options(method, tmp_path):
    rollout = RolloutSettings(num_generations=8, prompts_per_step=4)
    train = TrainConfig(steps=2, batch_size=rollout.completions_per_step, learning_rate=1e-4)
    config = trl_online_config(method, method.Settings(), rollout, train, tmp_path,
                               **vllm_options(gpu_memory_utilization=0.25))
    assert (config.use_vllm, config.vllm_mode, config.vllm_gpu_memory_utilization) == (True, "colocate", 0.25)
    assert config.num_generations == 8 and config.per_device_train_batch_size == 32


def test_grpo_sampler_correction_maps_to_trls_vllm_options(tmp_path):
    settings = grpo.Settings(sampler_correction="token_truncate", sampler_clip_max=2.0)
    rollout = RolloutSettings(num_generations=4, prompts_per_step=2)
    train = TrainConfig(steps=2, batch_size=8, learning_rate=1e-4)
    config = trl_online_config(grpo, settings, rollout, train, tmp_path, **vllm_options())
    assert config.vllm_importance_sampling_correction
    assert (config.vllm_importance_sampling_mode, config.vllm_importance_sampling_clip_max) == ("token_truncate", 2.0)
    with pytest.raises(ValueError, match="sampler_correction"):
        grpo.Settings(sampler_correction="sometimes")


def test_bad_vllm_options_say_what_is_allowed():
    with pytest.raises(ValueError, match="colocate"):
        vllm_options(mode="remote")
    with pytest.raises(ValueError, match="between 0 and 1"):
        vllm_options(gpu_memory_utilization=30)


def test_the_launch_script_refuses_a_machine_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = Path(__file__).resolve().parents[1] / "scripts" / "train_online_trl.py"
    spec = importlib.util.spec_from_file_location("train_online_trl", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit, match="needs CUDA"):
        script.main(["--method", "grpo", "--vllm"])
