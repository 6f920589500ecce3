"""duo_plugin.plots on small synthetic logs: PNGs are written and the plotted series are the logged ones."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")  # the `plots` extra (part of the `test` extra)

from duo_plugin import plots  # noqa: E402
from duo_plugin.integrations.torchtune_metrics import DuoMetricLogger, tensorboard_available  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _write_log(d, rows, name="log_1.txt"):
    d.mkdir(parents=True, exist_ok=True)
    with open(d / name, "w") as f:
        for step, kv in rows:
            f.write(f"Step {step} | " + " ".join(f"{k}:{v}" for k, v in kv.items()) + " \n")


def test_read_disk_log_parses_and_later_files_override(tmp_path):
    run = tmp_path / "run"
    _write_log(run / "logs", [(10, {"loss": 3.5, "lr": 0.001, "wall_s": 1.0}), (20, {"loss": 3.0, "wall_s": 2.0}),
                              (20, {"val_ppl": 40.0, "val_nll": 3.69})], "log_100.txt")
    _write_log(run / "logs", [(20, {"loss": 2.9, "wall_s": 2.5}), (30, {"loss": 2.5, "wall_s": 3.5})], "log_200.txt")
    log = plots.read_disk_log(run)
    assert log["loss"] == ([10, 20, 30], [3.5, 2.9, 2.5])
    assert log["val_ppl"] == ([20], [40.0])
    assert log["wall_s"] == ([10, 20, 30], [1.0, 2.5, 3.5])
    with pytest.raises(FileNotFoundError, match="log_"):
        plots.read_disk_log(tmp_path / "empty")


def test_training_curves_vs_steps_and_wall(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write_log(a / "logs", [(s, {"loss": 5.0 - s / 10, "wall_s": s * 0.5}) for s in (10, 20, 30)]
               + [(0, {"val_ppl": 500.0}), (30, {"val_ppl": 90.0})])
    _write_log(b / "logs", [(s, {"loss": 4.0 - s / 20, "wall_s": s * 2.0}) for s in (10, 20)]
               + [(20, {"val_ppl": 120.0})])
    out = tmp_path / "png" / "curves.png"
    data = plots.plot_training_curves({"duo": a, "mdlm": b}, out)
    assert out.read_bytes()[:8] == PNG
    assert data["training loss"]["duo"] == ([10.0, 20.0, 30.0], [4.0, 3.0, 2.0])
    assert data["training loss"]["mdlm"] == ([10.0, 20.0], [3.5, 3.0])
    assert data["validation NELBO perplexity"]["duo"] == ([0.0, 30.0], [500.0, 90.0])
    out2 = tmp_path / "wall.png"
    data = plots.plot_training_curves({"duo": a, "mdlm": b}, out2, x="wall")
    assert out2.read_bytes()[:8] == PNG
    assert data["training loss"]["mdlm"] == ([20.0, 40.0], [3.5, 3.0])
    assert data["validation NELBO perplexity"]["duo"] == ([15.0], [90.0])  # step 0 has no wall_s record
    _write_log(tmp_path / "nowall" / "logs", [(1, {"loss": 1.0})])
    with pytest.raises(ValueError, match="wall_s"):
        plots.plot_training_curves({"x": tmp_path / "nowall"}, tmp_path / "x.png", x="wall")


def test_genppl_plots(tmp_path):
    res = {"duo": [(32, 80.0), (8, 200.0), (16, 120.0)], "mdlm": [(8, 400.0), (16, float("nan"))]}
    out = tmp_path / "g.png"
    data = plots.plot_genppl_vs_steps(res, out, reference=30.0)
    assert out.read_bytes()[:8] == PNG
    panel = data["Gen PPL vs sampling steps"]
    assert panel["duo"] == ([8.0, 16.0, 32.0], [200.0, 120.0, 80.0])
    assert panel["mdlm"] == ([8.0], [400.0])
    assert panel["data"][1] == [30.0, 30.0]
    out = tmp_path / "e.png"
    data = plots.plot_genppl_vs_entropy({"duo": [(5.1, 200.0), (5.3, 80.0)]}, out)
    assert out.read_bytes()[:8] == PNG
    assert data["Gen PPL vs entropy"]["duo"] == ([5.1, 5.3], [200.0, 80.0])


def test_cli(tmp_path):
    _write_log(tmp_path / "r" / "logs", [(1, {"loss": 2.0}), (2, {"loss": 1.0})])
    out = tmp_path / "c.png"
    assert plots.main(["training", "--run", f"r={tmp_path / 'r'}", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG


def test_duo_metric_logger_writes_disk_with_wall_time(tmp_path):
    lg = DuoMetricLogger(log_dir=str(tmp_path / "logs"), tensorboard=False)
    lg.log_dict({"loss": 1.5}, 1)
    lg.log_dict({"loss": 1.25, "val_ppl": 9.0}, 2)
    lg.close()
    log = plots.read_disk_log(tmp_path)
    assert log["loss"] == ([1, 2], [1.5, 1.25])
    assert log["wall_s"][0] == [1, 2] and 0 <= log["wall_s"][1][0] <= log["wall_s"][1][1]
    assert lg.tensorboard is None
    with pytest.raises(ValueError, match="tensorboard"):
        DuoMetricLogger(log_dir=str(tmp_path / "x"), tensorboard="yes")


def test_duo_metric_logger_tensorboard_auto(tmp_path):
    lg = DuoMetricLogger(log_dir=str(tmp_path / "logs"))
    if tensorboard_available():
        lg.log_dict({"loss": 1.0}, 1)
        lg.close()
        assert any((tmp_path / "logs" / "tensorboard").rglob("events.out.tfevents*"))
    else:
        assert lg.tensorboard is None
        lg.close()
        with pytest.raises(ImportError, match="tensorboard"):
            DuoMetricLogger(log_dir=str(tmp_path / "y"), tensorboard=True)
