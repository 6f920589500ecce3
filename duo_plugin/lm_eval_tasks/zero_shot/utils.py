"""Loaders/pre-processing for the Duo paper's zero-shot perplexity sets (docs/method.md §8, Table 2).

Online tasks (``duo_zs_<set>``) load the paper's HF datasets/splits via ``datasets`` and map every document to
``{"text": ...}`` with a light detokenizer for the sets the paper detokenizes (WikiText, PTB, LM1B, Lambada;
written from the published description, not a byte-exact copy of the paper's code). Offline tasks
(``duo_zs_<set>_local``) read ``<data_dir>/<set>.jsonl`` (``{"text": ...}`` per line, already detokenized),
``data_dir`` from ``--metadata '{"data_dir": ...}'`` or ``$DUO_ZS_DATA_DIR``.
"""

import os
import re
from pathlib import Path

SETS = ("ptb", "wikitext", "lm1b", "lambada", "ag_news", "pubmed", "arxiv")


def wikitext_detokenize(s: str) -> str:
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    s = re.sub(r" ([.,;:!?)\]}])", r"\1", s)
    s = re.sub(r"([(\[{]) ", r"\1", s)
    s = s.replace(" 's", "'s").replace(" n't", "n't")
    s = re.sub(r"= = = (.*?) = = =", r"=== \1 ===", s)
    s = re.sub(r"= = (.*?) = =", r"== \1 ==", s)
    return s


def ptb_detokenize(s: str) -> str:
    s = s.replace(" 's", "'s").replace(" n't", "n't").replace(" '", "'").replace("s ' ", "s' ")
    s = s.replace(" N ", " 1 ").replace("<unk>", "?").replace("\\/", "/")
    return re.sub(r" ([.,;:!?%])", r"\1", s).strip()


def lm1b_detokenize(s: str) -> str:
    s = s.replace(" 's", "'s").replace(" n't", "n't").replace("`` ", '"').replace(" ''", '"')
    s = re.sub(r" ([.,;:!?%)])", r"\1", s)
    return re.sub(r"([($]) ", r"\1", s).strip()


def lambada_detokenize(s: str) -> str:
    return s.replace("“", '"').replace("”", '"').replace("’", "'").strip()


def _wikitext_articles(lines):
    """Join WikiText lines into articles (a line ' = Title = ' starts a new article)."""
    docs, cur = [], []
    for line in lines:
        if re.match(r"^ = [^=].* = $", line.rstrip("\n")) and cur:
            docs.append("".join(cur))
            cur = []
        cur.append(line)
    if cur:
        docs.append("".join(cur))
    return [wikitext_detokenize(d).strip() for d in docs if d.strip()]


def _map_text(dataset, field, fn=None):
    fn = fn or (lambda s: s)
    return dataset.map(lambda d: {"text": fn(d[field])}, remove_columns=dataset.column_names)


def process_wikitext(dataset):
    import datasets

    return datasets.Dataset.from_dict({"text": _wikitext_articles(dataset["text"])})


def process_ptb(dataset):
    return _map_text(dataset, "sentence", ptb_detokenize)


def process_lm1b(dataset):
    return _map_text(dataset, "text", lm1b_detokenize)


def process_lambada(dataset):
    return _map_text(dataset, "text", lambada_detokenize)


def process_ag_news(dataset):
    return _map_text(dataset, "text")


def process_article(dataset):
    return _map_text(dataset, "article", wikitext_detokenize)


def load_local(name=None, data_dir=None, **kwargs):
    """``custom_dataset`` hook of ``duo_zs_<set>_local``: ``{"test": <data_dir>/<name>.jsonl}``."""
    import datasets

    data_dir = data_dir or os.environ.get("DUO_ZS_DATA_DIR")
    if not data_dir:
        raise ValueError(
            f"duo_zs_{name}_local needs the data directory: --metadata '{{\"data_dir\": \"/path\"}}' or "
            f"DUO_ZS_DATA_DIR=/path, holding {name}.jsonl with one {{\"text\": ...}} per line"
        )
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected one JSON object with a 'text' field per line)")
    return datasets.load_dataset("json", data_files={"test": str(path)})
