"""Monte Carlo summaries of scored requests (docs/evaluation.md §5): per task, the spread of the per-request MC
standard errors and how many multiple-choice decisions lie inside the MC noise.

:class:`MCRecorder` collects ``(nelbo, stderr, n_tokens)`` per scored request (or rolling document) and the
multiple-choice groups; :meth:`MCRecorder.summary` is the JSON-able table the lm-eval adapter logs and writes, and
that recipes and benchmarks can use directly.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

from duo_plugin._io import atomic_write_text

__all__ = ["MCRecorder"]

log = logging.getLogger("duo_plugin.eval")


class MCRecorder:
    """Per-task records of MC standard errors and multiple-choice decisions.

    Args:
        labels: constant fields copied into every task's summary (estimator line, M, time sampling, weights...).
        causal: exact scores (AR): the log lines name the estimator only.
    """

    def __init__(self, labels: Optional[dict] = None, causal: bool = False):
        self.labels = dict(labels or {})
        self.causal = bool(causal)
        self.records: Dict[str, List[Tuple[float, float, int]]] = defaultdict(list)
        self.decisions: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
        self.samples_used: List[int] = []

    def record(self, task: Optional[str], nelbo: float, stderr: float, n_tokens: int) -> None:
        self.records[task or "unknown"].append((float(nelbo), float(stderr), int(n_tokens)))

    def count_decisions(self, tasks: Sequence[Optional[str]], doc_ids, ll: Sequence[float],
                        se: Sequence[float]) -> None:
        """Multiple-choice decisions (requests sharing a task and ``doc_id``): count those whose top-2 margin is
        within 1.96 MC standard errors of the difference (the choice could flip with other MC noise)."""
        if doc_ids is None:
            return
        groups: Dict[Tuple[str, int], List[int]] = defaultdict(list)
        for r, d in enumerate(doc_ids):
            if d is not None:
                groups[(tasks[r] or "unknown", d)].append(r)
        for (task, _), rs in groups.items():
            if len(rs) < 2:
                continue
            top = sorted(rs, key=lambda r: -ll[r])[:2]
            margin = ll[top[0]] - ll[top[1]]
            noise = math.sqrt(se[top[0]] ** 2 + se[top[1]] ** 2)
            c = self.decisions[task]
            c[0] += 1
            c[1] += int(math.isfinite(noise) and margin <= 1.96 * noise) if math.isfinite(margin) else 0

    def summary(self) -> Dict[str, dict]:
        """Per task: number of scored items, tokens, mean NELBO, mean / RMS / max MC standard error of the summed
        log-likelihoods and the standard error of the task's total (nats); multiple-choice decisions and the
        fraction inside the noise; the mean number of MC samples used; the labels."""
        out = {}
        used = self.samples_used
        for task, rec in sorted(self.records.items()):
            se = [s for _, s, _ in rec if math.isfinite(s)]
            dec = self.decisions.get(task, [0, 0])
            out[task] = {
                "n": len(rec),
                "tokens": int(sum(n for _, _, n in rec)),
                "mean_nelbo": sum(v for v, _, _ in rec) / max(1, len(rec)),
                "mean_stderr": (sum(se) / len(se)) if se else float("nan"),
                "rms_stderr": math.sqrt(sum(s * s for s in se) / len(se)) if se else float("nan"),
                "max_stderr": max(se) if se else float("nan"),
                "total_stderr": math.sqrt(sum(s * s for s in se)) if se else float("nan"),
                "mc_samples_mean": (sum(used) / len(used)) if used else (0 if self.causal else
                                                                         self.labels.get("mc_samples")),
                **self.labels,
                "decisions": dec[0],
                "decisions_within_noise": dec[1],
                "frac_decisions_within_noise": (dec[1] / dec[0]) if dec[0] else None,
            }
        return out

    def flush(self, kind: str, path: Optional[str] = None) -> Dict[str, dict]:
        """Log the summary (a warning when more than 5 % of the decisions lie inside the noise) and write it as JSON
        to ``path`` when given. Returns it."""
        summary = self.summary()
        for task, s in summary.items():
            est = s.get("estimator", "")
            if self.causal:
                log.info("duo [%s] %s: n=%d, %s", kind, task, s["n"], est)
                continue
            log.info("duo MC stderr [%s] %s: n=%d mean=%.4g rms=%.4g max=%.4g nats (%s)", kind, task, s["n"],
                     s["mean_stderr"], s["rms_stderr"], s["max_stderr"], est)
            if s["decisions"]:
                level = logging.WARNING if s["frac_decisions_within_noise"] > 0.05 else logging.INFO
                log.log(level,
                        "duo MC noise [%s] %s: %d of %d multiple-choice decisions (%.0f%%) have a top-2 margin within "
                        "1.96 MC standard errors of the difference (mean MC stderr %.3g nats, %s); raise mc_samples "
                        "or set mc_target_stderr", kind, task, s["decisions_within_noise"], s["decisions"],
                        100 * s["frac_decisions_within_noise"], s["mean_stderr"], est)
        if path:
            atomic_write_text(path, json.dumps(summary, indent=2, sort_keys=True))
        return summary
