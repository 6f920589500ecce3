"""duo_pretrain with a BERT-like tokenizer.json ([PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4, as bert-base-uncased
but tiny), one padded sentence per row and ``data.pad_mode: official``: every tokenizer id is an ordinary id of the
run (the model folder's ``valid_vocab``), and MDLM with ``mask_id: "[MASK]"`` reuses the tokenizer's own mask token
(no extra row) — what ``duo/lm1b_small`` and ``duo/mdlm_lm1b_small`` do with bert-base-uncased."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def bert_like(tiny_assets, tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train([str(tiny_assets["corpus"])], trainers.WordPieceTrainer(vocab_size=120, special_tokens=SPECIALS))
    d = tmp_path_factory.mktemp("bert_like")
    tok.save(str(d / "tokenizer.json"))
    return d


def _cfg(make_cfg, bert_like, name, **over):
    cfg = OmegaConf.create(make_cfg(name, **{"tokenizer": {"path": str(bert_like)}, "data.packing": "pad",
                                             "data.pad_mode": "official", "max_steps": 2, **over}))
    return cfg


def _final(out):
    from duo_plugin.models.checkpoint import load_pretrained

    return load_pretrained(out / "final")


def test_official_mode_duo_run_treats_every_tokenizer_id_as_ordinary(make_cfg, bert_like, tmp_path):
    from duo_plugin.data.tokenizers import load_tokenizer
    from duo_plugin.recipes import duo_pretrain as dp

    k = int(load_tokenizer(bert_like).vocab_size)
    cfg = _cfg(make_cfg, bert_like, "duo_official", **{"curriculum.steps": 1})
    s = dp.run(cfg)
    assert len(s["losses"]) == 2
    model = _final(tmp_path / "duo_official")
    assert model.vocab_size == k and bool(model.valid_vocab.all())  # K_eff = len(tokenizer), [PAD]/[UNK] included
    bad = _cfg(make_cfg, bert_like, "duo_bad", **{"data.valid_vocab": {"include_pad": False}})
    with pytest.raises(dp.ConfigError, match="data.valid_vocab.include_pad: false contradicts data.pad_mode"):
        dp.run(bad)


def test_official_mode_mdlm_reuses_the_tokenizer_mask_token(make_cfg, bert_like, tmp_path):
    from duo_plugin.data.tokenizers import load_tokenizer
    from duo_plugin.recipes import duo_pretrain as dp

    tok = load_tokenizer(bert_like)
    k = int(tok.vocab_size)
    cfg = _cfg(make_cfg, bert_like, "mdlm_official", objective={
        "_component_": "duo_plugin.objectives.mdlm.MDLMObjective", "mask_id": "[MASK]"},
        **{"model.time_conditioning": False})
    for sec in ("curriculum", "schedule", "kernels", "adapt"):
        cfg.pop(sec, None)
    dp.run(cfg)
    model = _final(tmp_path / "mdlm_official")
    mask_id = tok.encode("[MASK]")[0]
    assert model.vocab_size == k and model.duo_metadata["mask_id"] == mask_id == 4
    vv = model.valid_vocab
    assert not bool(vv[mask_id]) and int(vv.sum()) == k - 1  # every other id, [PAD] and [UNK] included
    assert model.time_conditioning is False
