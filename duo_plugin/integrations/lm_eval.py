"""lm-evaluation-harness backend ``duo``: a thin adapter over :class:`duo_plugin.eval.scoring.RequestScorer`.

Usage (after ``pip install duo-plugin``; lm-eval 0.4.13)::

    lm_eval  --model duo --model_args pretrained=CKPT_DIR,mc_samples=32 --tasks duo_shakespeare_ppl \
             --include_path $(python -c "import duo_plugin.integrations.lm_eval as m; print(m.TASKS_DIR)")
    duo-eval --model duo --model_args pretrained=CKPT_DIR --tasks duo_shakespeare_ppl   # adds the bundled tasks

This module does what lm-eval's ``TemplateLM`` pattern asks of a backend: it parses ``--model_args`` into one
:class:`DuoLMConfig`, loads the model folder and its tokenizer, turns requests into token ids, and formats results.
What the numbers are (docs/evaluation.md) is the library's: the model folder's noise process
(:func:`duo_plugin.eval.processes.process_for_model`: Duo/UDLM uniform-state, MDLM absorbing, AR causal) and

* ``loglikelihood``: ``-NELBO(continuation | [BOS] + context)`` summed over the continuation (a Monte Carlo estimate
  of a lower bound on log p), with the one-pass ``is_greedy`` check; exact for AR models; or the official Duo
  harness' score with ``likelihood=official`` / ``official_suffix`` (scored with the **raw** weights by default, as
  the official harness loads them; ``weights=ema`` to score the EMA weights; the choice is in every summary);
* ``loglikelihood_rolling``: the bound over rolling windows scoring every token once (word/byte perplexities are
  upper bounds);
* ``generate_until``: :func:`duo_plugin.sampling.generate_continuations` for every process (Duo/UDLM, MDLM: the
  one sampling loop with the folder's scheduler; AR: left-to-right decoding with the KV cache) with ``[BOS] +
  context`` clamped as prompt, options in one :class:`~duo_plugin.sampling.SamplerOptions`. ``do_sample: false`` /
  ``temperature: 0`` select "greedy" decoding (diffusion: the argmax of x_θ before each posterior step, Greedy-Tail
  noise removal -- not autoregressive greedy decoding; AR: the argmax).

Noise is seeded per request from a hash of its token ids (``seed``), so scores do not depend on the batch, ``--limit``
or request order. Scoring packs the rows (request × MC sample) of all requests into forwards of ``max_batch_tokens``
padded tokens (``--batch_size`` additionally caps the rows per call). On CPU the intra-op threads follow
``cpu_threads`` (default ``auto``: one thread for small models, see :mod:`duo_plugin.runtime`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import lm_eval.models  # noqa: F401  -- MUST precede @register_model (else the registry is left holding only our entry)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from duo_plugin.eval.mc import MCPolicy
from duo_plugin.eval.processes import check_scorable, process_for_model
from duo_plugin.eval.scoring import LIKELIHOOD_MODES, RequestScorer, ScoringConfig
from duo_plugin.eval.windows import WindowSpec, request_index, rolling_windows, truncate_left

log = logging.getLogger("duo_plugin.lm_eval")

TASKS_DIR = Path(__file__).resolve().parent.parent / "lm_eval_tasks"

#: ``top_p`` used for lm-eval's greedy requests (``do_sample: false`` / ``temperature: 0``): the nucleus keeps only the
#: argmax of x_θ, so every posterior step uses the one-hot argmax of the denoiser's prediction.
GREEDY_TOP_P = 1e-9
#: What the network is told for the conditional NELBO (docs/evaluation.md has the measurement behind the default).
DEFAULT_CONDITIONING = "alpha_t"
#: Rows per sampler call in ``generate_until`` (and per official-mode call) when lm-eval passes its default batch
#: size of 1.
DEFAULT_BATCH_SIZE = 64

__all__ = ["DuoLM", "DuoLMConfig", "GREEDY_TOP_P", "TASKS_DIR", "LIKELIHOOD_MODES", "check_scorable",
           "parse_batch_size", "rolling_windows", "request_index", "truncate_left"]


def _as_bool(v) -> bool:
    if isinstance(v, str):
        if v.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if v.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {v!r}")
    return bool(v)


def parse_batch_size(value, default: int = 32) -> int:
    """Parse lm-eval's ``--batch_size`` (a string: ``'8'``, ``'auto'``, ``'auto:4'``; ``auto`` -> ``default``)."""
    if value is None:
        return int(default)
    if isinstance(value, int) and not isinstance(value, bool):
        b = value
    else:
        s = str(value).strip().lower()
        if s.startswith("auto"):
            log.info("duo: batch_size=%r -> %d (no automatic batch-size search; pass an integer)", value, default)
            return int(default)
        try:
            b = int(float(s))
        except ValueError:
            raise ValueError(f"batch_size must be an integer or 'auto', got {value!r}") from None
    if b < 1:
        raise ValueError(f"batch_size must be >= 1, got {value!r}")
    return b


_NONE = (None, "", "none", "None", "null")


@dataclass
class DuoLMConfig:
    """Every ``--model_args`` option of the backend (strings from the CLI are converted by :meth:`from_args`).

    Model: ``weights`` (``ema`` | ``raw``; default ``raw`` for ``likelihood=official*`` as the official harness,
    else ``ema``), ``device`` (``cpu`` | ``cuda[:N]``), ``dtype`` (``float32`` | ``bfloat16`` autocast on CUDA),
    ``max_length`` (≤ the model's ``max_seq_len``), ``cpu_threads`` (``auto`` | N on CPU; default ``auto`` for a
    model folder, the process's setting for a model passed in from Python).
    Scoring (:class:`~duo_plugin.eval.scoring.ScoringConfig`): ``mc_samples``, ``time_sampling``,
    ``mc_target_stderr`` / ``mc_max_samples`` (two-stage adaptive MC, :mod:`duo_plugin.eval.mc`), ``likelihood``,
    ``conditioning``, ``greedy_check``, ``seed``, ``t_min``, ``batch_size`` / ``max_batch_size`` (rows per
    forward; lm-eval's default 1 = unset), ``max_batch_tokens``, ``rolling_context`` (default ``max_length // 4``),
    ``window_eos``, ``progress``, ``mc_stderr_path`` (JSON of the per-task MC summary).
    Generation (:class:`~duo_plugin.sampling.SamplerOptions`): ``gen_steps``, ``noise_removal``, ``max_gen_toks``,
    ``block_len`` (semi-autoregressive windows beyond the model's width), ``predictor`` (``ancestral`` | ``psi``)
    with the Ψ settings ``psi_*``, ``guidance_weight``, ``posterior_impl`` (docs/sampling.md).
    """

    weights: Optional[str] = None
    device: Optional[str] = None
    dtype: str = "float32"
    max_length: Optional[int] = None
    cpu_threads: Optional[str] = None
    mc_samples: int = 128
    time_sampling: str = "stratified"
    mc_target_stderr: Optional[float] = None
    mc_max_samples: Optional[int] = None
    likelihood: str = "nelbo"
    conditioning: str = DEFAULT_CONDITIONING
    greedy_check: str = "onepass"
    seed: int = 0
    t_min: float = 1e-3
    batch_size: Optional[str] = None
    max_batch_size: Optional[str] = None
    max_batch_tokens: Optional[int] = None
    rolling_context: Optional[int] = None
    window_eos: bool = True
    progress: bool = True
    mc_stderr_path: Optional[str] = None
    gen_steps: int = 64
    noise_removal: str = "greedy"
    max_gen_toks: int = 256
    block_len: Optional[int] = None
    predictor: str = "ancestral"
    psi_high_mode: str = "pure-posterior"
    psi_middle_mode: str = "pure-posterior"
    psi_low_mode: str = "pure-posterior"
    psi_high_frac: float = 0.2
    psi_middle_frac: float = 0.6
    psi_time_profile: str = "linear"
    guidance_weight: float = 1.0
    posterior_impl: str = "auto"

    @classmethod
    def from_args(cls, **kwargs) -> "DuoLMConfig":
        """The config of ``--model_args`` values (strings or Python values); an unknown key is one error naming
        the valid ones."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - set(fields))
        if unknown:
            raise ValueError(f"unknown --model_args for duo: {unknown}; valid: pretrained, tokenizer, "
                             f"{', '.join(fields)}")
        hints = typing.get_type_hints(cls)
        out = {}
        for key, value in kwargs.items():
            kind = hints[key]
            base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
            if value in _NONE or (key == "block_len" and value in (0, "0")):
                out[key] = None if type(None) in typing.get_args(kind) else fields[key].default
            elif base is bool:
                out[key] = _as_bool(value)
            elif base in (int, float):
                out[key] = base(float(value)) if base is int else float(value)
            else:
                out[key] = value if key in ("batch_size", "max_batch_size") else str(value)
        return cls(**out)

    def weights_choice(self) -> str:
        """``ema`` | ``raw``: the weights loaded from a model folder."""
        w = self.weights if self.weights is not None else ("raw" if self.likelihood != "nelbo" else "ema")
        w = {"model": "raw"}.get(w, w)
        if w not in ("ema", "raw"):
            raise ValueError(f"weights must be 'ema' or 'raw', got {self.weights!r}")
        return w

    def rows(self) -> Tuple[int, Optional[int]]:
        """``(batch size, row cap per scoring forward)``: lm-eval's default 1 means unset."""
        if self.batch_size in (None, 1, "1"):
            rows, cap = DEFAULT_BATCH_SIZE, None
        else:
            rows = cap = parse_batch_size(self.batch_size)
        if self.max_batch_size is not None:
            rows = cap = min(rows, parse_batch_size(self.max_batch_size))
        return rows, cap

    def scoring(self, weights_label: str) -> ScoringConfig:
        rows, cap = self.rows()
        if int(self.mc_samples) < 1:
            raise ValueError(f"mc_samples must be >= 1, got {self.mc_samples}")
        policy = MCPolicy(int(self.mc_samples), self.mc_target_stderr, self.mc_max_samples, self.time_sampling)
        return ScoringConfig(policy, self.likelihood, self.conditioning, self.greedy_check, int(self.seed),
                             float(self.t_min), cap, self.max_batch_tokens, rows, bool(self.progress), weights_label)

    def sampler_options(self, rows: int):
        """The :class:`~duo_plugin.sampling.SamplerOptions` of ``generate_until`` (validated: a bad Ψ mode or
        predictor raises here); ``rows`` sequences per sampler call."""
        from duo_plugin.sampling import SamplerOptions

        keys = ("noise_removal", "predictor", "guidance_weight", "posterior_impl", "psi_high_mode", "psi_middle_mode",
                "psi_low_mode", "psi_high_frac", "psi_middle_frac", "psi_time_profile")
        return SamplerOptions.from_config({k: getattr(self, k) for k in keys}, steps=int(self.gen_steps),
                                          block_len=int(self.block_len or 0), chunk_size=int(rows), progress=False)


def _load(pretrained, model, tokenizer, cfg: DuoLMConfig, device: torch.device):
    """``(model, tokenizer, weights label)`` from a model folder or from objects passed in (Python use)."""
    if (pretrained is None) == (model is None):
        raise ValueError("DuoLM needs exactly one of pretrained=CHECKPOINT_DIR (CLI) or model=nn.Module (Python)")
    label = "as given"
    if model is None:
        from duo_plugin.models.checkpoint import DIT_EMA_FILE, EMA_DIR, load_pretrained

        w = cfg.weights_choice()
        has_ema = (Path(pretrained) / DIT_EMA_FILE).exists() or (Path(pretrained) / EMA_DIR).is_dir()
        label = "ema" if (w == "ema" and has_ema) else ("raw (the folder has no EMA)" if w == "ema" else "raw")
        model = load_pretrained(pretrained, weights="ema" if w == "ema" else "model", device=str(device))
    if tokenizer is None:
        if pretrained is None:
            raise ValueError("pass tokenizer= (a DuoTokenizer or a path) together with model=")
        tokenizer = Path(pretrained) / "tokenizer"
        if not tokenizer.exists():
            raise FileNotFoundError(f"{tokenizer} not found: the checkpoint has no tokenizer/ subdir; pass "
                                    "tokenizer=PATH in --model_args")
    if isinstance(tokenizer, (str, os.PathLike)):
        import duo_plugin.integrations.torchtune_tokenizer  # noqa: F401  (registers the 'torchtune' descriptor)
        from duo_plugin.data.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    return model.to(device).eval(), tokenizer, label


@register_model("duo")
class DuoLM(TemplateLM):
    """The ``duo`` lm-eval backend (module docstring). ``pretrained`` (alias ``checkpoint``): a model folder; or pass
    ``model=`` (an ``nn.Module`` following the denoiser convention, or a causal model) and ``tokenizer=``
    programmatically; every other keyword is a :class:`DuoLMConfig` field."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "DuoLM":
        """lm-eval's ``--model_args`` entry: a bad argument is one line with exit status 2 on the command line
        (:func:`duo_plugin.integrations.lm_eval_cli.model_args_errors`)."""
        from duo_plugin.integrations.lm_eval_cli import model_args_errors

        with model_args_errors(cls):
            return super().create_from_arg_string(arg_string, additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None) -> "DuoLM":
        from duo_plugin.integrations.lm_eval_cli import model_args_errors

        with model_args_errors(cls):
            return super().create_from_arg_obj(arg_dict, additional_config)

    def __init__(self, pretrained: Optional[str] = None, *, checkpoint: Optional[str] = None,
                 model: Optional[torch.nn.Module] = None, tokenizer=None, **model_args):
        super().__init__()
        if pretrained is not None and checkpoint is not None and pretrained != checkpoint:
            raise ValueError("pass the checkpoint once: pretrained=DIR (checkpoint= is an alias)")
        pretrained = pretrained if pretrained is not None else checkpoint
        self.config = cfg = DuoLMConfig.from_args(**model_args)
        dt = {"float32": None, "fp32": None, "auto": None, "bfloat16": "bf16", "bf16": "bf16"}
        if str(cfg.dtype) not in dt:
            raise ValueError(f"dtype must be float32 or bfloat16, got {cfg.dtype!r}")
        dev = str(cfg.device or "cpu")
        if dev.startswith("cuda") and not torch.cuda.is_available():
            log.warning("duo: device %r requested but CUDA is not available; using cpu", dev)  # lm-eval's default
            dev = "cpu"
        self._device = torch.device(dev)
        cfg.weights_choice()  # validate before loading anything
        model, self.tokenizer, weights_label = _load(pretrained, model, tokenizer, cfg, self._device)
        self.model = model
        self.is_ar = check_scorable(model, pretrained)
        if self._device.type == "cpu" and (cfg.cpu_threads is not None or pretrained is not None):
            from duo_plugin.runtime import configure_cpu  # a model folder (CLI) gets the policy; Python: when asked

            choice = configure_cpu(cfg.cpu_threads or "auto", n_params=sum(p.numel() for p in model.parameters()))
            log.info("duo: %s", choice.log_line())
        self.process_spec = process_for_model(model, pretrained)
        self.vocab_size = int(model.vocab_size)
        if int(self.tokenizer.vocab_size) > self.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} ids but the model embeds only "
                             f"{self.vocab_size}; use the tokenizer the checkpoint was trained with")
        model_len = int(model.max_seq_len)
        self.max_length = int(cfg.max_length) if cfg.max_length is not None else model_len
        if not 2 <= self.max_length <= model_len:
            raise ValueError(f"max_length must be in [2, {model_len}] (the model's max_seq_len), got {cfg.max_length}")
        rolling = self.max_length // 4 if cfg.rolling_context is None else int(cfg.rolling_context)
        spec = WindowSpec(self.prefix_token_id, self.eot_token_id, self.max_length, rolling, bool(cfg.window_eos),
                          self.is_ar)
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.eot_token_id
        self.scorer = RequestScorer(model, self.process_spec, spec, cfg.scoring(weights_label), pad_id=pad,
                                    device=self._device, autocast=dt[str(cfg.dtype)])
        self.denoiser, self.valid_vocab, self.process = self.scorer.denoiser, self.scorer.valid_vocab, \
            self.scorer.process
        self.batch_size = self.scorer.config.official_batch_size
        self.sampler_options = cfg.sampler_options(self.batch_size)
        self.block_len = None if cfg.block_len is None else int(cfg.block_len)
        if self.block_len is not None and not 1 <= self.block_len < self.max_length - 1:
            raise ValueError(f"block_len must lie in [1, {self.max_length - 2}] for this model, got {cfg.block_len}")
        self._greedy_logged = False
        log.info("duo: %s; scoring calls hold at most %s padded tokens (scores do not depend on it)",
                 self.scorer.estimator(), self.scorer.max_batch_tokens)

    # --- TemplateLM plumbing --------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def prefix_token_id(self) -> int:
        return int(self.tokenizer.bos_id)

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        return list(self.tokenizer.encode(string, add_bos=False, add_eos=False))

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def estimator(self) -> str:
        return self.scorer.estimator()

    def mc_summary(self) -> Dict[str, dict]:
        return self.scorer.mc_summary()

    def _flush(self, kind: str) -> None:
        self.scorer.recorder.flush(kind, self.config.mc_stderr_path)

    # --- scoring --------------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        new_reqs, tasks, docs = [], [], []
        for req in requests:
            context, continuation = req.args
            if context == "":
                ctx_enc, cont_enc = [], self.tok_encode(continuation)
            else:
                ctx_enc, cont_enc = self._encode_pair(context, continuation)
            new_reqs.append(((context, continuation), ctx_enc, cont_enc))
            tasks.append(getattr(req, "task_name", None))
            docs.append(getattr(req, "doc_id", None))
        return self._loglikelihood_tokens(new_reqs, task_names=tasks, doc_ids=docs, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, task_names=None, doc_ids=None, disable_tqdm: bool = False, **kwargs):
        """``[((ctx_str, cont_str), ctx_ids, cont_ids)] -> [(log-likelihood, is_greedy)]`` (BOS prepended)."""
        out = self.scorer.loglikelihood([(ctx, cont) for _, ctx, cont in requests], task_names, doc_ids,
                                        progress=not disable_tqdm)
        self._flush("loglikelihood")
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        docs = [self.tok_encode(req.args[0]) for req in requests]
        out = self.scorer.loglikelihood_rolling(docs, [getattr(r, "task_name", None) for r in requests],
                                                progress=not disable_tqdm)
        self._flush("loglikelihood_rolling")
        return out

    # --- generation -----------------------------------------------------------------------------------------
    def _decoding(self, do_sample, temperature) -> Tuple[float, float, str]:
        """``(temperature, top_p, noise_removal)`` for one request's gen_kwargs (see the module docstring)."""
        greedy = (do_sample is not None and not do_sample) or (temperature is not None and float(temperature) == 0.0)
        if greedy:
            if not self._greedy_logged and not self.is_ar:
                self._greedy_logged = True
                log.warning("duo: do_sample=false / temperature=0 requested: using diffusion 'greedy' decoding (argmax "
                            "of x_theta before each posterior step, top_p=%g, Greedy-Tail noise removal). This is NOT "
                            "autoregressive greedy decoding: the posterior still mixes in seeded uniform noise.",
                            GREEDY_TOP_P)
            return 1.0, GREEDY_TOP_P, "greedy"
        temp = 1.0 if temperature is None else float(temperature)
        if not temp > 0:
            raise ValueError(f"generate_until: temperature must be >= 0, got {temperature!r}")
        return temp, 1.0, self.config.noise_removal

    def _prepare(self, req) -> tuple:
        """``(prompt ids, max_gen, until, (temperature, top_p, noise_removal))`` of one request."""
        context, gen_kwargs = req.args
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(kw.pop("max_gen_toks", self.config.max_gen_toks))
        limit = self.max_length - 1
        if max_gen < 1 or ((self.is_ar or self.block_len is None) and max_gen > limit):
            raise ValueError(f"max_gen_toks={max_gen} must lie in [1, {limit}] for this model"
                             + ("" if self.is_ar else " (set block_len in --model_args to generate beyond the window)"))
        decoding = self._decoding(kw.pop("do_sample", None), kw.pop("temperature", None))
        ctx = self.tok_encode(context) if context else []
        room = limit - (max_gen if self.block_len is None or self.is_ar else min(max_gen, self.block_len))
        return [self.prefix_token_id] + ctx[max(0, len(ctx) - room):], max_gen, until, decoding

    def _finish(self, new: List[int], until) -> str:
        if self.eot_token_id in new:
            new = new[: new.index(self.eot_token_id)]
        text = self.tok_decode(new)
        for stop in until:
            if stop and stop in text:
                text = text[: text.index(stop)]
        return text

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Continuations from :func:`duo_plugin.sampling.generate_continuations`, for every process the toolkit
        trains (the scheduler is picked from the folder's metadata; AR models decode left to right with the KV
        cache); the prompt ``[BOS] + context`` is clamped; each request draws from its own seeded generator."""
        from duo_plugin.diffusion import streams
        from duo_plugin.diffusion.uniform import row_generators
        from duo_plugin.sampling import generate_continuations

        prepared = [self._prepare(req) for req in requests]
        results: List[Optional[str]] = [None] * len(requests)
        groups: Dict[tuple, List[int]] = defaultdict(list)
        for i, (_, g, _, decoding) in enumerate(prepared):
            groups[(g, decoding)].append(i)
        step, tag = (streams.EVAL_GENERATE_AR, "ar") if self.is_ar else (streams.EVAL_GENERATE, "gen")
        for (g, (temp, top_p, mode)), members in groups.items():
            prompts = [prepared[i][0] for i in members]
            gens = [row_generators(self.config.seed, step, [request_index(p, f"{tag}{g}")], device=self._device)[0]
                    for p in prompts]
            opts = self.sampler_options.replace(temperature=temp, top_p=top_p, noise_removal=mode)
            new = generate_continuations(self.model, prompts, g, opts, generators=gens, eos_id=self.eot_token_id,
                                         window=self.max_length, denoiser=None if self.is_ar else self.denoiser,
                                         schedule=getattr(self.process, "schedule", None), device=self._device)
            for i, ids in zip(members, new):
                results[i] = self._finish(ids, prepared[i][2])
        return results  # type: ignore[return-value]
