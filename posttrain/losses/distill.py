"""Per-token divergences between a student and a teacher for distillation (algo=distill).

Notation, per token position n: p_s = softmax(z_s[n]) the student's next-token distribution, p_t = softmax(z_t[n])
the teacher's, over the vocabulary V. All divergences are in nats, computed in float32 (float64 if given).

Two kinds, registered in DIVERGENCES (`Divergence.full_vocab` says which):

- full-vocabulary divergences, `fn(student_logits [N, V], teacher_logits [N, V], *, beta) -> [N]`:
    forward_kl  KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)        (mode-covering; plain KD, Hinton et al.)
    reverse_kl  KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)        (mode-seeking; MiniLLM)
    jsd         generalised JSD(beta) (Agarwal et al. 2024, GKD), teacher first:
                JSD_b = b KL(p_t || m) + (1 - b) KL(p_s || m),  m = b p_t + (1 - b) p_s,  0 < b < 1.
                b = 0.5 is the symmetric Jensen-Shannon divergence (<= log 2). As b -> 0, JSD_b / b -> forward KL;
                as b -> 1, JSD_b / (1 - b) -> reverse KL (this is the GKD paper's convention; TRL's `beta`
                weights the mixture the other way round in some versions, so check before comparing numbers).
  They need the [N, V] logits of BOTH models at the N scored positions of a micro-batch. The teacher's are
  constants (no grad); the student's are recomputed tile by tile: `chunked_vocab_divergence` takes the student's
  final hidden states and lm_head and evaluates `chunk_size` tokens at a time under activation checkpointing, so
  besides the teacher's [N, V] only one [chunk_size, V] block of the student is ever alive, forward or backward.

- the sampled (token-level) reverse-KL estimator, `fn(student_logprobs [N], teacher_logprobs [N]) -> [N]`:
    sampled_reverse_kl  k1 = log p_s(y_n) - log p_t(y_n) at the token y_n the student sampled,
  an unbiased one-sample estimate of KL(p_s || p_t) at that position WHEN y_n ~ p_s (on-policy, temperature 1).
  Its gradient is the score-function one, (log p_s(y) - log p_t(y)) grad log p_s(y), whose expectation under
  y ~ p_s is the exact gradient of the reverse KL (the E[grad log p_s] term vanishes); the value is returned as
  k1 + sg(k1) (log p_s - sg(log p_s)), equal to k1, with that gradient. Per token only (no credit to later
  tokens), as in on-policy distillation with a per-token reward -k1. It needs only the two log-probs of the
  sampled tokens, which the fused log-prob op gives without any [N, V] tensor. On offline tokens (not drawn
  from the student) it is a biased objective, not the reverse KL.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from posttrain.losses import DIVERGENCES


@dataclass(frozen=True)
class Divergence:
    name: str
    full_vocab: bool  # True: fn(student_logits, teacher_logits, *, beta) ; False: fn(student_lp, teacher_lp)
    fn: Callable[..., torch.Tensor]


def register_divergence(name: str, full_vocab: bool):
    def decorator(fn):
        DIVERGENCES.register(name)(Divergence(name, full_vocab, fn))
        return fn

    return decorator


def _kl_from_logprobs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row of log-probabilities [N, V] -> [N] (0 log 0 = 0)."""
    return torch.where(log_p > -math.inf, log_p.exp() * (log_p - log_q), torch.zeros_like(log_p)).sum(-1)


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)


@register_divergence("forward_kl", full_vocab=True)
def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.5) -> torch.Tensor:
    """KL(p_t || p_s) per token: [N, V], [N, V] -> [N]. `beta` is ignored (one signature for the family)."""
    return _kl_from_logprobs(_log_softmax(teacher_logits), _log_softmax(student_logits))


@register_divergence("reverse_kl", full_vocab=True)
def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.5) -> torch.Tensor:
    """KL(p_s || p_t) per token: [N, V], [N, V] -> [N]. `beta` is ignored."""
    return _kl_from_logprobs(_log_softmax(student_logits), _log_softmax(teacher_logits))


@register_divergence("jsd", full_vocab=True)
def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.5) -> torch.Tensor:
    """b KL(p_t || m) + (1 - b) KL(p_s || m), m = b p_t + (1 - b) p_s, per token (module docstring), 0 < b < 1."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1 (got {beta}); beta -> 0 / 1 approach forward / reverse KL")
    log_s, log_t = _log_softmax(student_logits), _log_softmax(teacher_logits)
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log1p(-beta)]), dim=0)
    return beta * _kl_from_logprobs(log_t, log_m) + (1.0 - beta) * _kl_from_logprobs(log_s, log_m)


@register_divergence("sampled_reverse_kl", full_vocab=False)
def sampled_reverse_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log p_s(y) - log p_t(y) per sampled token, with the score-function gradient (module docstring).
    [N], [N] -> [N]; the teacher's log-probs are constants."""
    k1 = student_logprobs - teacher_logprobs.detach()
    return k1.detach() + k1.detach() * (student_logprobs - student_logprobs.detach())


def full_vocab_divergence(name: str, key: str | None = None) -> Divergence:
    """The full-vocabulary divergence `name`, or for the sampled estimator the exact one it estimates."""
    divergence = DIVERGENCES.get(name, key)
    return divergence if divergence.full_vocab else DIVERGENCES.get("reverse_kl")


def _chunk_divergence(hidden, weight, bias, teacher_logits, fn, beta, temperature):
    dtype = torch.promote_types(hidden.dtype, torch.float32)  # bf16 / fp16 accumulate in float32; float64 stays
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    return fn(logits / temperature, teacher_logits, beta=beta)


def chunked_vocab_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: Callable[..., torch.Tensor],
    *,
    beta: float = 0.5,
    student_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Per-token `divergence(student_logits, teacher_logits, beta=beta)` [N], with student_logits =
    (student_hidden @ student_weight.T + student_bias) / temperature built `chunk_size` rows at a time.

    student_hidden [N, H] and student_weight [V, H] (+ bias [V]) carry the gradient; teacher_logits [N, V] are
    constants (already divided by their temperature). Each chunk runs under activation checkpointing, so the
    student's [chunk_size, V] logits exist for one chunk at a time in the forward and are recomputed chunk by
    chunk in the backward: extra memory O(chunk_size x V) instead of O(N x V). Values and gradients equal the
    unchunked computation.
    """
    if student_hidden.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"{student_hidden.shape[0]} student rows but {teacher_logits.shape[0]} teacher rows")
    if student_weight.shape[0] != teacher_logits.shape[-1]:
        raise ValueError(
            f"the student's vocabulary ({student_weight.shape[0]}) differs from the teacher's "
            f"({teacher_logits.shape[-1]}): distillation over the vocabulary needs one shared tokenizer"
        )
    teacher_logits = teacher_logits.detach()
    pieces = []
    for start in range(0, student_hidden.shape[0], chunk_size):
        end = start + chunk_size
        args = (student_hidden[start:end], student_weight, student_bias, teacher_logits[start:end])
        if torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad):
            pieces.append(checkpoint(_chunk_divergence, *args, divergence, beta, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_divergence(*args, divergence, beta, temperature))
    if not pieces:
        return student_hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)
