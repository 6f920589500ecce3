"""The restricted unpickler: pickled code never runs; tensors, containers and OmegaConf nodes come back as data."""

from __future__ import annotations

import collections
import os
import zipfile
from pathlib import Path

import pytest
import torch

from duo_plugin.convert.cli import main as convert_main
from duo_plugin.convert.safe_pickle import (LazyTensor, Placeholder, UnsafeCheckpointError, load_checkpoint,
                                            materialize, placeholder_name)


class _Payload:
    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


class _EvalPayload:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


def _save(obj, path):
    torch.save(obj, path)  # a real zip-format torch checkpoint
    return path


@pytest.mark.parametrize("where", ["top", "hyper_parameters"])
def test_planted_reduce_payload_is_refused_and_never_runs(tmp_path, where, capsys):
    canary = tmp_path / "canary"
    payload = _Payload(canary)
    obj = {"state_dict": {"backbone.w": torch.ones(2)}}
    obj["hyper_parameters" if where == "hyper_parameters" else "x"] = {"config": payload}
    path = _save(obj, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to call posix\.system|refusing to call nt\.system"):
        load_checkpoint(path)
    assert not canary.exists()
    with pytest.raises(SystemExit) as e:  # the CLI: one line, exit 2, nothing written, nothing run
        convert_main(["official", str(path), str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "refusing to call" in err and "\n" not in err
    assert not canary.exists() and not (tmp_path / "out").exists()


def test_eval_payload_is_refused(tmp_path):
    path = _save({"a": _EvalPayload()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to call (__builtin__|builtins)\.eval"):
        load_checkpoint(path)


def test_tensors_and_containers_round_trip(tmp_path):
    base = torch.arange(12, dtype=torch.float32).view(3, 4)
    obj = {"od": collections.OrderedDict(a=base, b=base[:, 1]), "l": [1, 2.5, "s", None, True, b"xy"],
           "t": (torch.tensor([1, 2], dtype=torch.int64), torch.zeros(2, dtype=torch.bfloat16)),
           "p": torch.nn.Parameter(torch.ones(3)), "s": {1, 2}}
    got = load_checkpoint(_save(obj, tmp_path / "ok.pt"))
    assert isinstance(got["od"], collections.OrderedDict) and isinstance(got["od"]["a"], LazyTensor)
    m = materialize(got)
    assert torch.equal(m["od"]["a"], base) and torch.equal(m["od"]["b"], base[:, 1])
    assert m["l"] == [1, 2.5, "s", None, True, b"xy"] and m["s"] == {1, 2}
    assert torch.equal(m["t"][0], obj["t"][0]) and m["t"][1].dtype == torch.bfloat16
    assert torch.equal(m["p"], torch.ones(3))


class _Inert:
    def __init__(self):
        self.x = 1


def test_other_classes_become_inert_placeholders(tmp_path):
    got = load_checkpoint(_save({"o": _Inert()}, tmp_path / "c.pt"))
    o = got["o"]
    assert isinstance(o, Placeholder) and placeholder_name(o).endswith("_Inert")
    assert o.state == {"x": 1}  # the state is stored, never applied to a real object


def test_not_a_zip_checkpoint(tmp_path):
    from duo_plugin.errors import UserError

    p = tmp_path / "x.ckpt"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a zip-format"):
        load_checkpoint(p)


def test_truncated_storage_is_an_error(tmp_path):
    src = _save({"w": torch.ones(100)}, tmp_path / "a.pt")
    dst = tmp_path / "b.pt"
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        for info in zi.infolist():
            data = zi.read(info)
            if "/data/" in info.filename:
                data = data[:40]
            zo.writestr(info.filename, data)
    got = load_checkpoint(dst)
    with pytest.raises(UnsafeCheckpointError, match="holds 40 bytes"):
        materialize(got)


def test_fixture_config_reads_as_plain_data():
    from duo_plugin.convert.safe_pickle import to_plain

    fix = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "official" / "duo_dit_tiny" / "lightning.ckpt"
    if not fix.is_file():
        pytest.skip("official fixtures not found")
    ck = load_checkpoint(fix)
    cfg = to_plain(ck["hyper_parameters"]["config"])
    assert cfg["model"]["hidden_size"] == 24 and cfg["algo"]["name"] == "duo"
    assert cfg["algo"]["time_conditioning"] is True
    assert placeholder_name(ck["hyper_parameters"]["tokenizer"]).endswith("GPT2TokenizerFast")


def test_build_on_allowed_function_cannot_alter_it():
    """GLOBAL torch._utils._rebuild_tensor_v2, then BUILD (None, {"__defaults__": (1, 2)}) on it (a setattr), would
    change our rebuild function for every later load if find_class handed out the shared function object."""
    import io

    from duo_plugin.convert import safe_pickle

    data = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__(K\x01K\x02ts\x86b."
    before = safe_pickle._rebuild_tensor.__defaults__
    got = safe_pickle.RestrictedUnpickler(io.BytesIO(data)).load()
    assert got.__defaults__ == (1, 2)  # the BUILD did happen, on a private copy
    assert safe_pickle._rebuild_tensor.__defaults__ == before
