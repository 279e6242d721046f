"""Text from a model, token by token: greedy or nucleus (top-p) sampling, reproducible from a seed.

The prompt is framed as the training data frames a document: a bos in front when the tokenizer puts
one in front of a text, otherwise the eos that ends the previous document (dpdist's token stream puts
one before every document, as GPT-2's ``<|endoftext|>`` does), so an empty prompt still has a token
to continue from.  The context is cropped to the model's ``max_seq_len``, keeping the most recent
tokens, and generation stops after an eos or ``max_new_tokens`` tokens.

Every step runs the model over the whole (cropped) context again: there is no key/value cache, which
is fine for the small models dpdist trains and keeps the model code free of inference-only state.

Only the tokenizer's own ids are ever chosen: a model's vocabulary may have more rows (a Hugging Face
config padded to a round size), which no text uses.  The next token is drawn on the CPU in float64
from a ``torch.Generator`` of its own, so a seed gives the same text on any device.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..data.text_tokenizer import TextTokenizer


def frame_prompt(tokenizer: TextTokenizer, prompt: str) -> list[int]:
    """The ids generation starts from: ``[bos] + prompt`` when the tokenizer opens a text with bos,
    else ``[eos] + prompt`` (a document follows the previous one's eos)."""
    opening = tokenizer.bos_id if tokenizer.add_bos else tokenizer.eos_id
    return [opening] + tokenizer.encode(prompt)


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One id from a vector of logits (ids at -inf are never chosen): the argmax when ``temperature``
    is 0, else a draw from ``softmax(logits / temperature)`` restricted to its nucleus, the smallest
    set of most likely ids whose probability reaches ``top_p``, renormalised."""
    logits = logits.detach().to("cpu", torch.float64)
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    ordered, order = torch.sort(probs, descending=True, stable=True)
    # An id is in the nucleus when the ids more likely than it do not reach top_p yet.
    kept = (torch.cumsum(ordered, dim=0) - ordered) < top_p
    nucleus = torch.zeros_like(probs).scatter_(0, order, torch.where(kept, ordered, 0.0))
    return int(torch.multinomial(nucleus, 1, generator=generator))


@torch.no_grad()
def sample(model: nn.Module, context: list[int], max_new_tokens: int, *, vocabulary: int, eos_id: int | None,
           temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> Iterator[int]:
    """The ids ``model`` continues ``context`` with, one at a time: at most ``max_new_tokens``, the
    last one ``eos_id`` if it came.  Ids from ``vocabulary`` on (rows that only pad the model's
    embedding) are never chosen.  ``model(ids)`` must give logits ``[1, T, V]`` and the model must carry
    ``cfg.max_seq_len``, as dpdist's models do."""
    if not context:
        raise ValueError("generation needs at least one context token (frame the prompt with frame_prompt)")
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise ValueError(f"need temperature >= 0, top_p in (0, 1] and max_new_tokens >= 1; got {temperature}, "
                         f"{top_p}, {max_new_tokens}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    window = model.cfg.max_seq_len
    ids = list(context)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids[-window:]], device=device))[0, -1]
        logits[vocabulary:] = float("-inf")
        token = next_token(logits, temperature, top_p, generator)
        ids.append(token)
        yield token
        if token == eos_id:
            return
