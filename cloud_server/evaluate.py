"""`splitlm eval`: a model, optionally with a PEFT adapter, on text or prompt/completion data.

Plain transformers + peft, nothing of splitlm's own graphs: the adapter the server writes is
judged by the tools people already use. Data are read and tokenized exactly as the edge client
does (`splitlm.edge_client.data`), so the loss is comparable with training's.

    loss        mean next-token cross-entropy over every learned token (token-weighted)
    perplexity  exp(loss)
    exact_match for prompt/completion data: greedy completion == the reference, whitespace-trimmed
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from splitlm.data import (IGNORE_INDEX, PromptExample, collate, encode, read_examples,
                                      tokenize)
from splitlm.export.bundle import load_model


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    tokens: int
    exact_match: float | None = None   # None for text data
    examples: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        out = f"loss {self.loss:.4f}  perplexity {self.perplexity:.3f}  ({self.tokens} tokens)"
        if self.exact_match is not None:
            out += f"  exact match {100 * self.exact_match:.1f}% of {self.examples}"
        return out


def load_for_eval(model: str, adapter: str | None = None):
    """(model, tokenizer) in eval mode; with the PEFT adapter applied if one is given."""
    from transformers import AutoTokenizer

    loaded, path = load_model(model)
    if adapter is not None:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(loaded, adapter).eval()
    return loaded, AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def mean_loss(model, sequences, *, pad_id: int, batch_size: int) -> tuple[float, int]:
    """Token-weighted mean loss over `sequences` and the number of learned tokens."""
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        batch = collate(sequences[start:start + batch_size], pad_token_id=pad_id)
        labels = torch.from_numpy(batch.labels)
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        loss = model(input_ids=torch.from_numpy(batch.input_ids),
                     attention_mask=torch.from_numpy(batch.attention_mask), labels=labels).loss
        total += float(loss) * n
        count += n
    return total / max(count, 1), count


@torch.no_grad()
def exact_match(model, tokenizer, pairs: list[PromptExample]) -> float:
    """Share of prompts whose greedy completion equals the reference (stripped)."""
    backend = tokenizer.backend_tokenizer
    hits = 0
    for pair in pairs:
        prompt = encode(backend, [pair.prompt])[0]
        want = encode(backend, [pair.completion])[0]
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=len(want) + 2, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
        hits += text.strip().split("\n")[0].strip() == pair.completion.strip()
    return hits / len(pairs)


def evaluate(model: str, data: str | Path, *, adapter: str | None = None, seq_len: int = 256,
             batch_size: int = 8, max_examples: int | None = None) -> EvalResult:
    examples = read_examples(data)[:max_examples]
    loaded, tokenizer = load_for_eval(model, adapter)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sequences = tokenize(examples, tokenizer.backend_tokenizer, seq_len=seq_len, eos_id=eos)
    loss, tokens = mean_loss(loaded, sequences, pad_id=pad, batch_size=batch_size)
    pairs = [e for e in examples if isinstance(e, PromptExample)]
    em = exact_match(loaded, tokenizer, pairs) if pairs else None
    return EvalResult(loss=loss, perplexity=math.exp(loss), tokens=tokens, exact_match=em, examples=len(pairs))
