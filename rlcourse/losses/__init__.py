"""One pure function per loss, named after its method: tensors in, tensors out."""

from rlcourse.losses.sft import dft_loss, sft_loss
from rlcourse.losses.reward import bradley_terry_loss, center_rewards_loss, margin_loss, reward_model_loss
from rlcourse.losses.dpo import dpo_loss, implicit_reward, ipo_loss

__all__ = ["sft_loss", "dft_loss", "dpo_loss", "ipo_loss", "implicit_reward",
           "bradley_terry_loss", "margin_loss", "center_rewards_loss", "reward_model_loss"]
