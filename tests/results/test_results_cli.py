import argparse
import shutil

import pandas as pd
import pytest

from results.cli import add_predict_command, add_results_commands


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lesiontune")
    commands = parser.add_subparsers(dest="command", required=True)
    results = commands.add_parser("results")
    add_results_commands(results.add_subparsers(dest="action", required=True))
    add_predict_command(commands)
    return parser.parse_args(list(argv))


def _run(*argv: str) -> int:
    args = _parse(*argv)
    return args.handler(args)


def test_results_actions_all_registered():
    parser = argparse.ArgumentParser()
    actions = parser.add_subparsers()
    add_results_commands(actions)

    assert set(actions.choices) == {"export", "leaderboard", "effects", "importance", "compare", "report",
                                    "evaluate", "export-model"}


def test_leaderboard_glob_adds_run_column(synthetic_run, tmp_path, capsys):
    for name in ("alpha", "beta"):
        shutil.copytree(synthetic_run, tmp_path / name)

    assert _run("results", "leaderboard", str(tmp_path / "*"), "--top", "3") == 0

    output = capsys.readouterr().out
    assert "Top 3 of 8 trials in 2 run(s) by val_pauc80" in output
    lines = output.splitlines()
    assert lines[1].split()[:2] == ["run", "trial_id"]
    assert lines[2].split()[:2] in (["alpha", "aaaa1111"], ["beta", "aaaa1111"])


def test_effects_and_importance_print_tables(synthetic_run, capsys):
    assert _run("results", "effects", str(synthetic_run)) == 0
    assert _run("results", "importance", str(synthetic_run), "--method", "ped-anova") == 0

    output = capsys.readouterr().out
    assert "of 3 finished trials in 1 run(s)" in output
    assert "learning_rate" in output
    assert "(ped-anova, 3 finished trials)" in output


def test_compare_rejects_same_run_twice(synthetic_run):
    with pytest.raises(ValueError, match="compare needs two different run folders, got 1"):
        _run("results", "compare", str(synthetic_run), str(synthetic_run))


def test_evaluate_refusal_reaches_cli(evaluated_run):
    with pytest.raises(ValueError, match="already evaluated on its test split"):
        _run("results", "evaluate", str(evaluated_run), "--top", "1")


def test_export_model_then_predict(evaluated_run, run_inputs, tmp_path, capsys):
    model_dir = tmp_path / "model"
    assert _run("results", "export-model", str(evaluated_run), "--trial", "aaaa1111", str(model_dir)) == 0
    images = run_inputs["images"]["path"].head(3).tolist()
    missing = str(tmp_path / "missing.png")

    status = _run("predict", str(model_dir), *images, missing, "--output", str(tmp_path / "scores.parquet"))

    assert status == 1
    assert "Scored 3 of 4 images" in capsys.readouterr().out
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    assert scores["path"].tolist() == [*images, missing]
    assert scores["error"].tolist()[-1] == "file not found"


def test_report_prints_path(synthetic_run, tmp_path, capsys):
    output = tmp_path / "r.html"

    assert _run("results", "report", str(synthetic_run), "--output", str(output), "--top", "1") == 0

    assert f"Wrote {output}" in capsys.readouterr().out
    assert output.is_file()
