"""Generative perplexity and unigram entropy of samples (Duo paper §5.2; docs/method.md §5 "Gen PPL and entropy").

* Gen PPL: samples are decoded with the diffusion tokenizer, re-tokenised with the scorer's tokenizer, and scored
  by a causal LM. NLL targets are every non-EOS token plus the first EOS (later EOS tokens are dropped);
  Gen PPL = exp(Σ NLL / #targets) over all samples (token-weighted).
* Entropy: for each sample, the unigram entropy (nats) of its generated ids (diffusion tokenizer ids, all L
  positions), then the mean over samples. Always reported next to Gen PPL: low-entropy (repetitive) samples get
  deceptively low Gen PPL.

The scorer is any causal LM callable ``scorer(tokens Long[B, T]) -> logits Float[B, T, V]`` where position i
predicts token i + 1. Loaders: :func:`load_dit_scorer` (our AR-objective DiT checkpoints), :func:`load_hf_scorer`
(any local Hugging Face causal-LM directory through ``transformers``, e.g. GPT-2 Large as in the paper; optional
extra ``duo-plugin[hf]``, offline) and ``duo_plugin.integrations.torchtune_scorer.load_torchtune_scorer`` (torchtune
builder + HF-format checkpoint). Every result carries the scorer's name (``scorer``): a Gen PPL is only comparable
with Gen PPLs from the same scorer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch


__all__ = ["unigram_entropy", "retokenize", "gen_ppl_and_entropy", "causal_nll", "ratio_stderr", "load_dit_scorer", "DiTScorer",
           "HFScorer", "load_hf_scorer", "scorer_name"]

Scorer = Callable[[torch.Tensor], torch.Tensor]


def unigram_entropy(ids: torch.Tensor) -> torch.Tensor:
    """Per-sample unigram entropy in nats: ``H_n = −Σ_v p_nv log p_nv`` with p_nv the frequency of id v in row n.

    Args: ids ``Long[N, L]``. Returns: ``float64 [N]`` (max ln L).
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be [N, L]; got {tuple(ids.shape)}")
    out = torch.empty(ids.shape[0], dtype=torch.float64)
    for n, row in enumerate(ids.long().cpu()):
        _, counts = torch.unique(row, return_counts=True)
        p = counts.to(torch.float64) / counts.sum()
        out[n] = -(p * p.log()).sum()
    return out


def _encode(tok, text: str) -> list[int]:
    try:
        return list(tok.encode(text, add_bos=False, add_eos=False))
    except TypeError:
        return list(tok.encode(text))


def retokenize(
    sample_ids: torch.Tensor,
    diffusion_tokenizer,
    scorer_tokenizer,
    eos_id_scorer: int,
    max_len: int,
    bos_id_scorer: Optional[int] = None,
) -> list[list[int]]:
    """Diffusion ids → scorer ids, one list per sample.

    Each sample is split at the diffusion tokenizer's EOS ids; BOS/PAD ids of the diffusion tokenizer are
    dropped; each segment is decoded to text and encoded with the scorer tokenizer (no special tokens); the
    segments are joined with ``eos_id_scorer`` (an EOS that ends the sample is kept). With ``bos_id_scorer`` the
    sequence starts with it. Truncated to ``max_len`` ids.
    """
    d_eos = getattr(diffusion_tokenizer, "eos_id", None)
    drop = {getattr(diffusion_tokenizer, "bos_id", None), getattr(diffusion_tokenizer, "pad_id", None)} - {None, d_eos}
    out = []
    for row in sample_ids.long().cpu().tolist():
        segs, cur = [], []
        ended = []
        for t in row:
            if d_eos is not None and t == d_eos:
                segs.append(cur)
                ended.append(True)
                cur = []
            elif t not in drop:
                cur.append(t)
        segs.append(cur)
        ended.append(False)
        ids = [] if bos_id_scorer is None else [int(bos_id_scorer)]
        for seg, e in zip(segs, ended):
            if seg:
                ids.extend(_encode(scorer_tokenizer, diffusion_tokenizer.decode(seg)))
            if e:
                ids.append(int(eos_id_scorer))
        out.append(ids[: int(max_len)])
    return out


def causal_nll(
    scorer: Scorer, seqs: Sequence[Sequence[int]], eos_id: int, batch_size: Optional[int] = None,
    pad_id: Optional[int] = None, max_batch_tokens: Optional[int] = None, per_sequence: Optional[list] = None,
) -> tuple[float, int]:
    """Σ NLL (nats) and #targets of ``seqs`` under a causal LM (``per_sequence``, a list: each scored sequence's
    ``(Σ NLL, #targets)`` is appended to it, in no particular order).

    Targets are positions 1..T-1 (position 0 is context only); a target counts if it is not EOS or it is the first
    EOS of its sequence. Sequences are sorted by length and right-padded (``pad_id``, default ``eos_id``) into calls
    of at most ``batch_size`` rows (None: no row cap) and ``max_batch_tokens`` padded tokens (None: the default of
    the scorer's device, :func:`~duo_plugin.eval.likelihood.default_max_batch_tokens`); padding is never a
    target and, the scorer being causal, never changes a real position's output. Computed in float64 from the
    scorer's logits.
    """
    from duo_plugin.eval.likelihood import default_max_batch_tokens, pack_rows

    pad = int(eos_id if pad_id is None else pad_id)
    total, count = 0.0, 0
    seqs = sorted((list(s) for s in seqs if len(s) >= 2), key=len, reverse=True)
    rows = None if batch_size is None else int(batch_size)
    if max_batch_tokens is None:
        dev = getattr(scorer, "device", None)
        max_batch_tokens = default_max_batch_tokens(dev if isinstance(dev, (str, torch.device)) else None)
    for batch in pack_rows([len(s) for s in seqs], rows, max_batch_tokens):
        chunk = [seqs[i] for i in batch]
        T = max(len(s) for s in chunk)
        toks = torch.full((len(chunk), T), pad, dtype=torch.long)
        real = torch.zeros(len(chunk), T, dtype=torch.bool)
        for i, s in enumerate(chunk):
            toks[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            real[i, : len(s)] = True
        with torch.no_grad():
            logits = scorer(toks)
        if logits.shape[:2] != toks.shape:
            raise ValueError(f"scorer returned {tuple(logits.shape)}; expected [B, T, V] with [B, T] = {tuple(toks.shape)}")
        logp = torch.log_softmax(logits.to(torch.float64), -1)
        tgt = toks[:, 1:].to(logp.device)
        nll = -logp[:, :-1].gather(-1, tgt[..., None]).squeeze(-1).cpu()
        is_eos = (toks == int(eos_id)) & real
        first_eos = is_eos & (is_eos.long().cumsum(-1) == 1)
        mask = real & (~is_eos | first_eos)
        m = mask[:, 1:]
        total += float(nll[m].sum())
        count += int(m.sum())
        if per_sequence is not None:
            per_sequence.extend(zip(torch.where(m, nll, torch.zeros((), dtype=nll.dtype)).sum(-1).tolist(),
                                    m.sum(-1).tolist()))
    return total, count


def ratio_stderr(per_sequence: Sequence[tuple[float, int]]) -> float:
    """Standard error of the token-weighted mean NLL ``Σ s_i / Σ n_i`` over sequences ``(s_i, n_i)``, the sequences
    being the independent units (the linearised ratio estimator: ``sqrt(N/(N-1) Σ (s_i - r n_i)^2) / Σ n_i``;
    NaN with fewer than 2 sequences). The SE of Gen PPL = exp(r) is ``exp(r) × this`` (delta method)."""
    n_seq = len(per_sequence)
    tot_n = sum(n for _, n in per_sequence)
    if n_seq < 2 or tot_n == 0:
        return float("nan")
    r = sum(s for s, _ in per_sequence) / tot_n
    ss = sum((s - r * n) ** 2 for s, n in per_sequence)
    return math.sqrt(n_seq / (n_seq - 1) * ss) / tot_n


def gen_ppl_and_entropy(
    sample_ids: torch.Tensor,
    *,
    diffusion_tokenizer,
    scorer: Scorer,
    scorer_tokenizer,
    eos_id_scorer: int,
    batch_size: Optional[int] = None,
    max_len: int = 1024,
    bos_id_scorer: Optional[int] = None,
    name: Optional[str] = None,
    max_batch_tokens: Optional[int] = None,
) -> dict:
    """Gen PPL (re-tokenised, scored by a causal LM) and mean unigram entropy of ``sample_ids Long[N, L]``.

    ``batch_size`` caps the rows and ``max_batch_tokens`` the padded tokens of each scorer call (samples sorted by
    length; the value does not depend on either up to floating-point rounding).

    Returns:
        ``dict(gen_ppl, gen_nll (nats/token), gen_nll_stderr (:func:`ratio_stderr` over the samples), entropy (mean nats), entropy_per_sample (list), n_samples, tokens
        (#scored scorer tokens), scorer (``name`` or :func:`scorer_name`), estimator)``.
    """
    if sample_ids.dim() != 2 or sample_ids.shape[0] == 0:
        raise ValueError(f"sample_ids must be a non-empty [N, L] tensor; got {tuple(sample_ids.shape)}")
    ent = unigram_entropy(sample_ids)
    seqs = retokenize(sample_ids, diffusion_tokenizer, scorer_tokenizer, eos_id_scorer, max_len, bos_id_scorer)
    per_seq: list = []
    total, count = causal_nll(scorer, seqs, eos_id_scorer, batch_size, max_batch_tokens=max_batch_tokens,
                              per_sequence=per_seq)
    if count == 0:
        raise ValueError("no token to score: every re-tokenised sample has fewer than 2 tokens")
    nll = total / count
    se = ratio_stderr(per_seq)
    return {
        "gen_ppl": math.exp(nll),
        "gen_nll": nll,
        "gen_nll_stderr": se,  # over samples (ratio estimator); Gen PPL's SE = gen_ppl * gen_nll_stderr
        "entropy": float(ent.mean()),
        "entropy_per_sample": ent.tolist(),
        "n_samples": int(sample_ids.shape[0]),
        "tokens": count,
        "scorer": name or scorer_name(scorer),
        "estimator": "exp(token-weighted mean causal NLL of the re-tokenised samples up to the first EOS)",
    }


def scorer_name(scorer) -> str:
    """The label printed next to a Gen PPL: the scorer's ``name`` attribute, else its class name."""
    return str(getattr(scorer, "name", None) or type(scorer).__name__)


class DiTScorer:
    """Causal scorer from an AR-objective DiT (built with ``causal=True``): ``tokens -> logits``.

    The model is called with σ = 0 (no time conditioning) and its output at position i is read as the
    distribution of token i + 1 (next-token convention of the AR objective).
    """

    def __init__(self, model: torch.nn.Module, name: Optional[str] = None):
        if not getattr(model, "causal", False):
            raise ValueError("the Gen PPL scorer must be a causal (AR-objective) model: build the DiT with causal=True")
        self.model = model.eval()
        self.name = name or "duo AR DiT"

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        tokens = tokens.to(dev)
        sigma = torch.zeros(tokens.shape[0], device=dev)
        return self.model(tokens, sigma).float()


def load_dit_scorer(path, *, weights: str = "ema", device: str = "cpu") -> DiTScorer:
    """Load our own AR-objective DiT checkpoint (``save_pretrained`` dir of a model built with ``causal=True``)."""
    from duo_plugin.models.checkpoint import load_pretrained

    return DiTScorer(load_pretrained(path, weights=weights, device=device), name=f"duo AR DiT ({Path(path).name})")


class _HFTokenizer:
    """``encode(text, add_bos=False, add_eos=False)`` / ``decode`` over a ``transformers`` tokenizer (no special
    tokens added: the Gen PPL protocol adds EOS itself)."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = tok.eos_token_id
        self.bos_id = tok.bos_token_id
        self.pad_id = tok.pad_token_id

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(self.tok.encode(text, add_special_tokens=False))
        if add_bos and self.bos_id is not None:
            ids = [int(self.bos_id)] + ids
        if add_eos and self.eos_id is not None:
            ids = ids + [int(self.eos_id)]
        return ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))


class HFScorer:
    """Causal scorer from a local Hugging Face causal-LM directory: ``tokens -> logits`` (float32).

    Attributes: ``tokenizer`` (encode/decode without special tokens), ``eos_id``, ``name`` (``hf:<dir name>``, e.g.
    ``hf:gpt2-large``), ``max_len`` (the model's ``n_positions`` / ``max_position_embeddings``).
    """

    def __init__(self, model, tokenizer, name: str):
        self.model = model.eval()
        self.tokenizer = _HFTokenizer(tokenizer)
        if self.tokenizer.eos_id is None:
            raise ValueError(f"{name}: the tokenizer has no eos_token_id; the Gen PPL protocol needs one")
        self.eos_id = int(self.tokenizer.eos_id)
        self.name = name
        cfg = model.config
        self.max_len = int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1024)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        return self.model(input_ids=tokens.to(dev)).logits.float()


def load_hf_scorer(path, *, device: str = "cpu", dtype: str = "float32") -> HFScorer:
    """Load a local Hugging Face causal LM (``config.json`` + weights + tokenizer files) as a Gen PPL scorer.

    Offline only (``local_files_only=True``) and without ``trust_remote_code``: the directory is data, no code in it
    is run. Needs the optional extra ``pip install 'duo-plugin[hf]'`` (``transformers``).
    """
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} is not a Hugging Face model directory (no config.json); pass a local dir "
                                "saved with save_pretrained (e.g. a downloaded gpt2-large)")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the Hugging Face Gen PPL scorer needs transformers: pip install 'duo-plugin[hf]'") from e
    torch_dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                   "bf16": torch.bfloat16}[str(dtype)]
    model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    model = model.to(device=device, dtype=torch_dtype)
    tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    return HFScorer(model, tok, name=f"hf:{p.name}")
