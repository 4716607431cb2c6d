"""Losses as pure functions of tensors, registered by name in one registry per family.

Every member of a family has the family's one signature, so a trainer calls any of them the same way, and
a name from another family fails at start naming the family ("'bt' is a reward-model loss, not a
preference-pair loss; the preference-pair losses are: dpo, ..."). Hyperparameters are explicit keyword
arguments; every loss returns `(loss, metrics)`, metrics a dict of detached tensors.

- PAIR_LOSSES (the DPO family: dpo, dpo_norm, simpo, ipo, hinge, wpo):
  (policy_chosen, policy_rejected, reference_chosen, reference_rejected, chosen_lengths, rejected_lengths,
  *, beta, label_smoothing, **loss_specific), all [B] per-sequence sums.
- REWARD_MODEL_LOSSES (bt, gpm): (chosen_values [B, D], rejected_values [B, D], gate [B, k] | None, *, margin, tau).
- SELF_PLAY_LOSSES (gpo, sppo): (policy_w, policy_l, reference_w, reference_l, target_w, target_l, *, beta).
- DIVERGENCES (distillation: forward_kl, reverse_kl, jsd over the vocabulary, [N, V] logits of both models ->
  [N]; sampled_reverse_kl from the two log-probs of the sampled tokens, [N] -> [N]): `posttrain.losses.distill`.
- POLICY_LOSSES (grpo, gspo, gspo_token): (logprobs, old_logprobs, advantages, mask, *, clip_low, clip_high,
  reference_logprobs, kl_beta, kl_estimator, entropy, entropy_coef, aggregation, constant_normalizer,
  token_weights), per-token [B, T].

Estimators beside them: SELF_PLAY_TARGETS (score matrix [.., K, K], tau -> per-response targets, keyed by the
self-play loss), ADVANTAGE_ESTIMATORS (rewards [P, G] -> advantages, keep mask), KL_ESTIMATORS (per-token
log-ratio -> per-token KL estimate), ROLLOUT_CORRECTIONS (off, tis, mis: (old_logprobs, rollout_logprobs, mask, *, cap)
-> per-token weights of the policy-gradient term). The SFT loss has no variants: `posttrain.losses.sft.sft_loss`.
"""

from posttrain.registry import Registry

PAIR_LOSSES: Registry = Registry("preference-pair loss", group="loss")
REWARD_MODEL_LOSSES: Registry = Registry("reward-model loss", group="loss")
SELF_PLAY_LOSSES: Registry = Registry("self-play loss", group="loss")
POLICY_LOSSES: Registry = Registry("policy-gradient loss", group="loss")
DIVERGENCES: Registry = Registry("distillation divergence", group="loss")
SELF_PLAY_TARGETS: Registry = Registry("self-play target")
ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator")
KL_ESTIMATORS: Registry = Registry("KL estimator")
ROLLOUT_CORRECTIONS: Registry = Registry("rollout correction")

# Importing the modules registers their losses.
from posttrain.losses import distill, dpo, policy, preference, rollout_correction, sft  # noqa: E402,F401
