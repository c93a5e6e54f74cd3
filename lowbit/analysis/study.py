"""The outlier study of one model: find the features, then ablate them against as many random dimensions."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.analysis.outliers import OutlierReport, ablate_dims, find_outliers, random_dims
from lowbit.eval.perplexity import perplexity


def is_causal_lm(model: nn.Module) -> bool:
    return callable(getattr(model, "generate", None)) and getattr(model, "lm_head", None) is not None or \
        type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def encoder_windows(tokenizer, text: str, tokens: int, window: int = 128) -> list[dict]:
    """Chunks of ``window`` - 2 tokens, each wrapped in the encoder's special tokens."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids[:tokens]
    first = [tokenizer.cls_token_id] if tokenizer.cls_token_id is not None else []
    last = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else []
    out = []
    for i in range(0, len(ids), window - 2):
        chunk = torch.tensor([first + ids[i:i + window - 2] + last])
        out.append({"input_ids": chunk, "attention_mask": torch.ones_like(chunk)})
    return out


@torch.no_grad()
def _embeddings(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states (sentence-transformers' recipe)."""
    vecs = [model(**b).last_hidden_state.mean(1) for b in batches]
    return torch.nn.functional.normalize(torch.cat(vecs), dim=-1)


def outlier_study(model: nn.Module, tokenizer, text: str, tokens: int = 2048, threshold: float = 6.0,
                  ablation: bool = True, progress: bool = True) -> tuple[OutlierReport, dict]:
    """Find outlier features over the first ``tokens`` tokens; ablate them (perplexity, or embedding cosine)."""
    from lowbit.analysis.outliers import token_windows

    causal = is_causal_lm(model)
    inputs = token_windows(tokenizer, text, tokens) if causal else encoder_windows(tokenizer, text, tokens)
    report = find_outliers(model, inputs, threshold, progress=progress)
    summary = report.summary()
    summary["model_kind"] = "causal LM" if causal else "encoder"
    dims = [f["dim"] for f in report.features]
    if ablation and dims:
        rand = random_dims(report.width, len(dims), dims)
        ab = {"dims": dims, "random_dims": rand, "tokens": tokens}
        if causal:
            ab["metric"] = "perplexity"
            ab["baseline"] = perplexity(model, tokenizer, text, tokens, progress=progress)
            with ablate_dims(model, dims, report.width):
                ab["outliers_zeroed"] = perplexity(model, tokenizer, text, tokens, progress=progress)
            with ablate_dims(model, rand, report.width):
                ab["random_zeroed"] = perplexity(model, tokenizer, text, tokens, progress=progress)
        else:
            ab["metric"] = "mean cosine similarity of sentence embeddings to the unablated model's"
            base = _embeddings(model, inputs)
            ab["baseline"] = 1.0
            with ablate_dims(model, dims, report.width):
                ab["outliers_zeroed"] = float((_embeddings(model, inputs) * base).sum(-1).mean())
            with ablate_dims(model, rand, report.width):
                ab["random_zeroed"] = float((_embeddings(model, inputs) * base).sum(-1).mean())
        summary["ablation"] = ab
    return report, summary
