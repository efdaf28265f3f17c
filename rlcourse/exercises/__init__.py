"""Auto-checked exercises: each ``check_...`` runs the learner's function and the package's on the same
random inputs and raises an AssertionError that says where they differ."""

from rlcourse.exercises.dataset_formats import check_detect_format, check_extract_prompt, check_unpair
from rlcourse.exercises.sft import check_dft_loss, check_sft_loss, check_token_logprobs
from rlcourse.exercises.policy_gradient import (
    check_clipped_surrogate, check_group_advantages, check_rloo_advantages,
)
from rlcourse.exercises.kl import check_exact_token_kl, check_kl_k3
from rlcourse.exercises.reward import check_bradley_terry_loss, check_reward_model_loss, check_spearman
from rlcourse.exercises.dpo import check_dpo_loss, check_implicit_reward, check_ipo_loss

__all__ = [
    "check_token_logprobs", "check_sft_loss", "check_dft_loss",
    "check_detect_format", "check_unpair", "check_extract_prompt",
    "check_rloo_advantages", "check_group_advantages", "check_clipped_surrogate",
    "check_bradley_terry_loss", "check_reward_model_loss", "check_spearman",
    "check_implicit_reward", "check_dpo_loss", "check_ipo_loss",
    "check_kl_k3", "check_exact_token_kl",
]

from rlcourse.exercises.preference_variants import (
    check_bco_loss, check_cpo_loss, check_dro_policy_loss, check_dro_value_loss, check_kto_loss,
    check_kto_reference_point, check_log_odds, check_orpo_loss, check_simpo_loss, check_simpo_reward,
)

__all__ += [
    "check_cpo_loss", "check_simpo_reward", "check_simpo_loss", "check_log_odds", "check_orpo_loss",
    "check_kto_reference_point", "check_kto_loss", "check_bco_loss", "check_dro_value_loss", "check_dro_policy_loss",
]
