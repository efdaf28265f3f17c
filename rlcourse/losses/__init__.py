"""One pure function per loss, named after its method: tensors in, tensors out. Every loss is exported here."""

from rlcourse.losses.sft import dft_loss, sft_loss
from rlcourse.losses.reward import bradley_terry_loss, center_rewards_loss, margin_loss, reward_model_loss
from rlcourse.losses.dpo import dpo_loss, implicit_reward, ipo_loss
from rlcourse.losses.cpo import cpo_loss, simpo_loss, simpo_reward
from rlcourse.losses.orpo import log_odds, odds_ratio_loss, orpo_loss
from rlcourse.losses.kto import kto_loss, kto_reference_point
from rlcourse.losses.bco import RewardShift, bco_loss, bco_pair_loss
from rlcourse.losses.dro import dro_loss, dro_policy_loss, dro_value_loss
from rlcourse.losses.rloo import reinforce_loss, reinforce_pp_advantages, rloo_advantages, rloo_loss
from rlcourse.losses.grpo import aggregate_loss, clip_fractions, grpo_advantages, grpo_loss, importance_ratio
from rlcourse.losses.off_policy import sampler_gap_metrics, sampler_importance_weights

__all__ = ["sft_loss", "dft_loss", "dpo_loss", "ipo_loss", "implicit_reward",
           "bradley_terry_loss", "margin_loss", "center_rewards_loss", "reward_model_loss",
           "cpo_loss", "simpo_loss", "simpo_reward", "orpo_loss", "odds_ratio_loss", "log_odds",
           "kto_loss", "kto_reference_point", "bco_loss", "bco_pair_loss", "RewardShift",
           "dro_loss", "dro_policy_loss", "dro_value_loss",
           "reinforce_loss", "rloo_advantages", "reinforce_pp_advantages", "rloo_loss",
           "grpo_advantages", "importance_ratio", "aggregate_loss", "grpo_loss", "clip_fractions",
           "sampler_importance_weights", "sampler_gap_metrics"]
