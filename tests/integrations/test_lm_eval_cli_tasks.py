"""duo-eval keeps its bundled lm-eval tasks when the user passes their own --include_path."""

import pytest

pytest.importorskip("lm_eval")


def test_user_include_path_keeps_bundled_tasks(tmp_path, monkeypatch):
    from lm_eval.tasks import manager

    from duo_plugin.integrations import lm_eval_cli

    mine = tmp_path / "my_tasks"
    mine.mkdir()
    (mine / "my_task.yaml").write_text(
        "task: my_own_task\ndataset_path: json\ndataset_kwargs:\n  data_files: x.jsonl\ntest_split: train\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n")
    monkeypatch.setattr(manager.TaskManager, "__init__", manager.TaskManager.__init__)  # restored afterwards
    before = set(manager.TaskManager(include_path=str(mine), include_defaults=False).all_tasks)
    assert "my_own_task" in before and "duo_shakespeare_ppl" not in before  # lm-eval alone: the user's dir only
    lm_eval_cli.keep_bundled_tasks()
    lm_eval_cli.keep_bundled_tasks()  # idempotent
    after = set(manager.TaskManager(include_path=str(mine), include_defaults=False).all_tasks)
    assert {"my_own_task", "duo_shakespeare_ppl"} <= after
    assert set(manager.TaskManager(include_defaults=False).all_tasks) >= {"duo_shakespeare_ppl"}
