"""Next-token sampling, shared by `CausalLM.generate` and the server's scheduler."""
from __future__ import annotations

from typing import Optional

import torch


def token_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """float32 probabilities [..., V] of logits [..., V] at `temperature` (> 0), restricted to the
    smallest set of tokens whose mass reaches `top_p` (at least the most likely one). The logits
    are shifted so that their maximum is 0 before the division: at any positive temperature,
    1e-45 included, nothing overflows and the result is never NaN."""
    z = logits.float()
    z = (z - z.amax(dim=-1, keepdim=True)) / temperature
    probs = torch.softmax(z, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        keep[..., 0] = True     # a top_p below float32's resolution (1e-300) still keeps one token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Token ids [...] drawn from logits [..., V]; greedy (argmax) at temperature 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = token_probs(logits, temperature, top_p)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
