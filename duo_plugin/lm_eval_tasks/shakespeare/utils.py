"""Loader for the bundled Shakespeare tasks (resolved relative to this file, so it works from any cwd)."""

from pathlib import Path

DATA = Path(__file__).with_name("sonnet_couplets.jsonl")


def load(**kwargs):
    """``custom_dataset`` hook: a DatasetDict with a ``test`` split of 24 sonnet couplets.

    lm-eval calls it with ``**metadata, **dataset_kwargs``; extra keyword arguments are ignored.
    """
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(DATA)})


def load_next_line(**kwargs):
    """``custom_dataset`` hook of ``duo_shakespeare_next_line``: 150 four-way next-line items (``test`` split) built
    from the held-out Shakespeare paragraphs by ``build_next_line.py``."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).with_name("next_line_mc.jsonl"))})
