import pytest

_TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
    "And by opposing end them. To die—to sleep,\n"
    "No more; and by a sleep to say we end\n"
    "The heart-ache and the thousand natural shocks\n"
    "That flesh is heir to: 'tis a consummation\n"
    "Devoutly to be wish'd. To die, to sleep;\n"
    "To sleep, perchance to dream—ay, there's the rub:\n"
)


@pytest.fixture(scope="session")
def train_text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "hamlet.txt"
    p.write_text(_TEXT * 20, encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def sp_tok(train_text_file, tmp_path_factory):
    from duo_plugin.data.tokenizers import train_sentencepiece

    out = tmp_path_factory.mktemp("sp")
    return train_sentencepiece([train_text_file], 300, out, hard_vocab_limit=False)
