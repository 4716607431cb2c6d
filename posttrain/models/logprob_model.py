"""`CausalLMWithLogprobs`: the module every trainer hands to the engine.

Its forward returns per-token log-probs (and entropies) of the targets straight from the final hidden
states and the lm_head weight through `posttrain.ops.linear_logprobs`, so the fused kernel never
materialises [tokens, vocab] logits. With `head_fn` it instead returns `head_fn(hidden_rows, weight, bias)` of
the scored positions (targets != IGNORE_INDEX): what needs more of the vocabulary than one log-prob per token
(distillation divergences, `posttrain.models.distillation`) runs there, inside the forward. With `token_weights`
it returns the scalar sum_t w_t * (-logp_t) through `posttrain.ops.linear_cross_entropy`, whose fused kernel
forms the head's gradients in this forward (the SFT loss: 3 GEMMs instead of 4).
Under ZeRO-3 the lm_head weight is registered as an external
parameter of this wrapper, so DeepSpeed gathers it for this forward.
"""

from __future__ import annotations

import torch
from torch import nn

from posttrain.data.chat import IGNORE_INDEX
from posttrain.models.attention import decoder_hidden_states, shares_prompts
from posttrain.ops import linear_cross_entropy, linear_logprobs


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class CausalLMWithLogprobs(nn.Module):
    def __init__(self, model: nn.Module, fused: bool = True, zero_stage: int = 0):
        super().__init__()
        self.policy = model
        self.fused = fused
        if zero_stage == 3:
            import deepspeed

            deepspeed.zero.register_external_parameter(self, self.lm_head.weight)

    @property
    def lm_head(self) -> nn.Module:
        return base_causal_lm(self.policy).get_output_embeddings()

    @property
    def shares_prompts(self) -> bool:
        """Whether forward takes `prompt_groups` (a row holding each prompt once for several completions)."""
        return shares_prompts(base_causal_lm(self.policy).config)

    def hidden_states(self, input_ids, position_ids=None, attention_mask=None, prompt_groups=None) -> torch.Tensor:
        """Final (normed) hidden states [B, T, H] of the decoder."""
        decoder = base_causal_lm(self.policy).get_decoder()
        return decoder_hidden_states(decoder, input_ids, position_ids, attention_mask, prompt_groups)

    def forward(
        self,
        input_ids,
        targets,
        position_ids=None,
        attention_mask=None,
        temperature: float = 1.0,
        head_fn=None,
        token_weights=None,
        prompt_groups=None,
        target_positions=None,
    ):
        """(logprobs [B, T], entropy [B, T]) float32 of `targets` (IGNORE_INDEX positions give 0).

        head_fn: instead, return head_fn(hidden [M, H], lm_head weight [V, H], lm_head bias [V] | None) for the M
        positions whose target is not IGNORE_INDEX, in row-major order. It runs inside this forward, where ZeRO-3
        has gathered the lm_head weight.
        token_weights [B, T] float: instead, return the float32 scalar sum_t token_weights_t * (-logp_t) over the
        positions whose target is not IGNORE_INDEX (`linear_cross_entropy`, fused when self.fused).
        prompt_groups: the row holds shared prompts (`decoder_hidden_states`); target_positions [M]: then
        `targets` [M] are the tokens predicted from those row positions (a shared prompt's last position predicts
        the first token of each of its completions), and the log-probs and entropies come back [M]."""
        hidden = self.hidden_states(input_ids, position_ids, attention_mask, prompt_groups)
        head = self.lm_head
        if target_positions is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_positions)
        if head_fn is not None:
            rows = hidden.reshape(-1, hidden.shape[-1])[targets.reshape(-1) != IGNORE_INDEX]
            return head_fn(rows, head.weight, head.bias)
        if token_weights is not None:
            return linear_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]),
                head.weight,
                targets.reshape(-1),
                token_weights.reshape(-1),
                bias=head.bias,
                temperature=temperature,
                ignore_index=IGNORE_INDEX,
                fused=self.fused,
            )
        logprobs, entropy = linear_logprobs(
            hidden.reshape(-1, hidden.shape[-1]),
            head.weight,
            targets.reshape(-1),
            bias=head.bias,
            temperature=temperature,
            fused=self.fused,
        )
        return logprobs.view(targets.shape), entropy.view(targets.shape)
