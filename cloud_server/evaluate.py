"""`splitlm eval`: a model, optionally with a PEFT adapter, on text or prompt/completion data.

Plain transformers + peft, nothing of splitlm's own graphs: the adapter the server writes is
judged by the tools people already use. Data are read and tokenized exactly as the edge client
does (`splitlm.edge_client.data`), so the loss is comparable with training's.

    loss        mean next-token cross-entropy over every learned token (token-weighted)
    perplexity  exp(loss)
    exact_match for prompt/completion data: greedy completion == the reference, whitespace-trimmed

With an adapter, `compare` judges the base model and the adapter in one run (one load: the base
is the PEFT model with its adapter switched off), which is the question a user asks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from splitlm.data import (IGNORE_INDEX, PromptExample, collate, encode, read_examples,
                                      tokenize)
from splitlm.export.bundle import load_model
from splitlm.progress import Progress


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

    def cells(self) -> list[str]:
        em = "-" if self.exact_match is None else \
            f"{100 * self.exact_match:.1f}% ({round(self.exact_match * self.examples)}/{self.examples})"
        return [f"{self.loss:.4f}", f"{self.perplexity:.3f}", em]


@dataclass(frozen=True)
class Comparison:
    """The base model and base + adapter on the same data."""
    base: EvalResult
    adapter: EvalResult

    def as_dict(self) -> dict:
        """The adapter's result at the top level (as without a comparison), the base's under "base"."""
        return {**self.adapter.as_dict(), "base": self.base.as_dict()}

    def table(self) -> str:
        rows = [["", "loss", "perplexity", "exact match"], ["base", *self.base.cells()],
                ["adapter", *self.adapter.cells()]]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                         for r in rows)


def load_for_eval(model: str, adapter: str | None = None):
    """(model, tokenizer) in eval mode; with the PEFT adapter applied if one is given."""
    from transformers import AutoTokenizer

    loaded, path = load_model(model)
    if adapter is not None:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(loaded, adapter).eval()
    return loaded, AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def mean_loss(model, sequences, *, pad_id: int, batch_size: int, progress: Progress | None = None) -> tuple[float, int]:
    """Token-weighted mean loss over `sequences` and the number of learned tokens."""
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        if progress is not None:
            progress.update(start)
        batch = collate(sequences[start:start + batch_size], pad_token_id=pad_id)
        labels = torch.from_numpy(batch.labels)
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        loss = model(input_ids=torch.from_numpy(batch.input_ids),
                     attention_mask=torch.from_numpy(batch.attention_mask), labels=labels).loss
        total += float(loss) * n
        count += n
    return total / max(count, 1), count


@torch.no_grad()
def exact_match(model, tokenizer, pairs: list[PromptExample], *, batch_size: int = 8,
                progress: Progress | None = None) -> float:
    """Share of prompts whose greedy completion equals the reference (stripped)."""
    hits = 0
    for i, (pair, text) in enumerate(zip(pairs, greedy_completions(model, tokenizer, pairs, batch_size=batch_size))):
        if progress is not None:
            progress.update(i)
        hits += text.strip().split("\n")[0].strip() == pair.completion.strip()
    return hits / len(pairs)


def greedy_completions(model, tokenizer, pairs: list[PromptExample], *, batch_size: int) -> list[str]:
    """Each prompt's greedy continuation, at most the reference's token count + 2 tokens long.

    `batch_size` prompts per `generate` call, left-padded: generate takes the position ids from
    the attention mask, so a padded prompt continues as it would alone (tests/test_compare.py
    checks batches of 8 against one prompt at a time). One at a time, the 64 held-out examples
    of `splitlm compare` took most of a round's judging."""
    backend = tokenizer.backend_tokenizer
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    texts = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        prompts = encode(backend, [p.prompt for p in chunk])
        budgets = [len(ids) + 2 for ids in encode(backend, [p.completion for p in chunk])]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # (B, width), left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max(budgets), do_sample=False, pad_token_id=pad)
        for row, budget in zip(out[:, width:].tolist(), budgets):
            row = row[:budget]
            row = row[:row.index(eos)] if eos in row else row  # generate pads a finished row after its eos
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def evaluate(model: str, data: str | Path, *, adapter: str | None = None, seq_len: int = 256,
             batch_size: int = 8, max_examples: int | None = None, progress: bool | None = False) -> EvalResult:
    """The model (with `adapter`, if given) on `data`. `progress`: None for a bar on a terminal
    and lines in a log, False for silence."""
    examples = read_examples(data)[:max_examples]
    loaded, tokenizer = load_for_eval(model, adapter)
    return judge(loaded, tokenizer, examples, seq_len=seq_len, batch_size=batch_size,
                 label="adapter" if adapter else "model", progress=progress)


def compare(model: str, data: str | Path, *, adapter: str, seq_len: int = 256, batch_size: int = 8,
            max_examples: int | None = None, progress: bool | None = False) -> Comparison:
    """The base model and the base model + `adapter` on `data`, from one load."""
    examples = read_examples(data)[:max_examples]
    loaded, tokenizer = load_for_eval(model, adapter)
    kw = dict(seq_len=seq_len, batch_size=batch_size, progress=progress)
    with loaded.disable_adapter():
        base = judge(loaded, tokenizer, examples, label="base", **kw)
    return Comparison(base=base, adapter=judge(loaded, tokenizer, examples, label="adapter", **kw))


def judge(loaded, tokenizer, examples, *, seq_len: int, batch_size: int, label: str,
          progress: bool | None) -> EvalResult:
    """Loss, perplexity and (for prompt/completion data) exact match of a loaded model."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sequences = tokenize(examples, tokenizer.backend_tokenizer, seq_len=seq_len, eos_id=eos)
    with _progress(f"{label} loss", len(sequences), "sequences", progress) as bar:
        loss, tokens = mean_loss(loaded, sequences, pad_id=pad, batch_size=batch_size, progress=bar)
        bar.update(len(sequences))
    pairs = [e for e in examples if isinstance(e, PromptExample)]
    em = None
    if pairs:
        with _progress(f"{label} exact match", len(pairs), "examples", progress) as bar:
            em = exact_match(loaded, tokenizer, pairs, batch_size=batch_size, progress=bar)
            bar.update(len(pairs))
    return EvalResult(loss=loss, perplexity=math.exp(loss), tokens=tokens, exact_match=em, examples=len(pairs))


def _progress(desc: str, total: int, unit: str, show: bool | None) -> Progress:
    """A progress meter; `show` False gives one whose lines go nowhere."""
    if show is False:
        import io

        return Progress(desc, total=total, unit=unit, stream=io.StringIO(), bar=False)
    return Progress(desc, total=total, unit=unit, bar=None)
