"""``summarize_runs``/``write_summary``: what the comparison tables average, and re-rendering
them from saved runs."""

import argparse
import importlib.util
import json
import math
import shlex
from pathlib import Path

import pytest

from energy_attn.cli import main
from energy_attn.training import corpus as corpus_module
from energy_attn.training.compare import (
    markdown_table,
    parse_grid,
    summarize_runs,
    variant_name,
    write_summary,
)
from energy_attn.training.loop import TrainConfig

REPO = Path(__file__).resolve().parents[2]
TINY = ["--n-layer", "1", "--n-head", "2", "--d-model", "16", "--context", "16", "--batch", "4",
        "--eval-batches", "1", "--stability-batch", "2", "--steps", "2", "--eval-interval", "2",
        "--threads", "1", "--quiet"]


def fake_run(losses, diverged_at=None, alpha=None, acc=0.5, kl=0.01, ms=10.0, machine=None):
    """A run log as ``train`` writes it: one validation every 25 steps at ``losses``."""
    evals = [{"step": 25 * i, "time": 2.0 * i, "val_loss": v, "attn_kl": kl if i else None}
             for i, v in enumerate(losses)]
    steps = diverged_at or 25 * (len(losses) - 1)
    train = [{"step": s, "loss": 1.0, "time": 0.08 * s, "step_time": ms / 1e3,
              **({} if alpha is None else {"alpha": alpha})} for s in range(1, steps + 1)]
    finite = [v for v in losses if math.isfinite(v)]
    log = {"config": {"device": "cpu"}, "train": train, "eval": evals,
           "summary": {"steps": steps, "diverged_at": diverged_at, "final_val_loss": losses[-1],
                       "best_val_loss": min(finite), "train_time": 0.08 * steps,
                       "median_step_ms": ms, "mean_attn_kl": kl, "final_val_acc": acc}}
    if diverged_at is not None:
        log["diverged_at"] = diverged_at
    if machine is not None:
        log["machine"] = machine
    return log


def test_diverged_runs_stay_out_of_every_mean():
    # A diverged run used to enter the means with its finite values: its step-0 best loss,
    # its time and KL up to the stop, its accuracy and α; only its NaN final loss dropped out.
    trained = [fake_run([5.0, 3.0, 2.0], alpha=0.9, acc=0.8, kl=0.02, ms=10.0),
               fake_run([5.0, 2.5, 1.0], alpha=0.7, acc=0.6, kl=0.04, ms=30.0)]
    diverged = fake_run([5.0, 1.5, math.nan], diverged_at=40, alpha=0.1, acc=0.1, kl=7.0,
                        ms=500.0)  # validated below the target before it diverged
    blew_up = fake_run([5.0, 900.0, 1e4])  # finite all along: not diverged, averaged in
    logs = {"a": [trained[0], diverged, trained[1]], "b": [diverged, diverged],
            "c": [trained[0], blew_up]}
    a, b, c = summarize_runs(logs, target=2.6, extra_keys=("final_val_acc",))

    assert (a["seeds"], a["diverged"], a["reached"]) == (3, 1, "2/3")
    assert (a["final_val_loss"], a["final_val_loss_std"]) == (1.5, pytest.approx(0.5 ** 0.5))
    assert (a["best_val_loss"], a["median_step_ms"]) == (1.5, 20.0)
    assert a["mean_attn_kl"] == pytest.approx(0.03)
    assert (a["train_time"], a["final_val_acc"]) == (4.0, pytest.approx(0.7))
    assert a["mean_alpha"] == pytest.approx(0.8)
    assert (a["steps_to_target"], a["time_to_target"]) == (37.5, 3.0)  # steps 50 and 25

    assert (b["seeds"], b["diverged"], b["reached"], b["mean_alpha"]) == (2, 2, "0/2", None)
    for key in ("final_val_loss", "best_val_loss", "median_step_ms", "train_time",
                "mean_attn_kl", "final_val_acc", "steps_to_target", "time_to_target"):
        assert b[key] is None and b[key + "_std"] is None, key
    row_b = markdown_table([a, b, c], target=2.6).splitlines()[3]
    assert row_b == "| b | 2 | 2 | – | – | – | – | – | 0/2 | – | – | – | – |"

    assert (c["diverged"], c["final_val_loss"], c["best_val_loss"]) == (0, 5001.0, 3.5)
    assert c["reached"] == "1/2"


def test_a_non_finite_value_of_a_run_that_did_not_diverge_is_not_dropped():
    # Its training loss stayed finite but its validation loss did not: the mean says so.
    rows = summarize_runs({"a": [fake_run([5.0, 2.0]), fake_run([5.0, math.inf])]})
    assert math.isnan(rows[0]["final_val_loss"]) and rows[0]["diverged"] == 0
    assert "nan ± nan" in markdown_table(rows)


def test_summary_names_the_machine_the_runs_recorded(tmp_path):
    # A table re-rendered on another machine used to name that machine, not the runs'.
    where = {"cpu": "the training box", "cores": 64, "torch": "x", "python": "y",
             "device": "cpu"}
    logs = {"a": [fake_run([5.0, 2.0], machine=where)]}
    write_summary(logs, summarize_runs(logs), tmp_path, plot=False)
    assert json.loads((tmp_path / "compare.json").read_text())["machine"] == where


def test_digits_experiment_rerenders_saved_runs_without_its_data(tmp_path, monkeypatch):
    # Re-rendering the committed digits tables needed scikit-learn's data set although every
    # run was saved: without it the script skipped and wrote nothing.
    spec = importlib.util.spec_from_file_location(
        "digits_experiment", REPO / "benchmarks" / "experiments" / "digits.py")
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)

    def no_data():
        raise AssertionError("the data set was loaded although every run is saved")

    monkeypatch.setattr(digits, "load_digits", no_data)
    runs = tmp_path / "runs"
    runs.mkdir()
    saved = [fake_run([2.3, 1.0, 0.4]), fake_run([2.3, 1.0, math.nan], diverged_at=30)]
    for seed, log in enumerate(saved):
        (runs / f"optimizer=adamw-s{seed}.json").write_text(json.dumps(log))
    before = {p.name: p.read_text() for p in runs.iterdir()}
    assert digits.main(["--task", "vit", "--grid", "optimizer=adamw", "--seeds", "0,1",
                        "--target-loss", "0.5", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert (row["diverged"], row["reached"], row["final_val_loss"]) == (1, "1/2", 0.4)
    assert "| optimizer=adamw | 2 | 1 | 0.4000 ± 0.0000 |" in (tmp_path / "compare.md").read_text()
    assert {p.name: p.read_text() for p in runs.iterdir()} == before


@pytest.mark.parametrize("out", sorted(p.name for p in (REPO / "docs" / "results").iterdir()
                                       if (p / "compare.json").is_file()))
def test_committed_tables_are_the_summaries_of_their_saved_runs(out):
    # docs/results/<out>/compare.json is what summarize_runs makes of runs/ today: a change to
    # what the means cover has to re-render the committed tables.
    out = REPO / "docs" / "results" / out
    saved = json.loads((out / "compare.json").read_text())
    p = argparse.ArgumentParser()
    p.add_argument("--grid", action="append")
    p.add_argument("--seeds", default="0,1,2")
    args, _ = p.parse_known_args(shlex.split(saved["command"]))
    logs = {}
    for variant in parse_grid(args.grid, TrainConfig):
        name = variant_name(variant)
        for seed in args.seeds.split(","):
            run = out / "runs" / f"{name}-s{seed}"
            log = run / "log.json" if run.is_dir() else run.with_name(run.name + ".json")
            logs.setdefault(name, []).append(json.loads(log.read_text()))
    extra = ("final_val_acc",) if "final_val_acc" in saved["rows"][0] else ()
    rows = summarize_runs(logs, saved["target_loss"], extra_keys=extra)
    assert json.loads(json.dumps(rows)) == saved["rows"]
    assert markdown_table(rows, saved["target_loss"]) + "\n" == (out / "compare.md").read_text()


def test_each_variant_trains_on_its_own_validation_split(corpus, tmp_path, monkeypatch,
                                                         capsys):
    # compare loaded one corpus, the base config's, for every variant: a grid over val_fraction
    # trained and validated every run on the base's 5% split while their configs said otherwise.
    loads = []
    load_corpus = corpus_module.load_corpus

    def counted(path, **kw):
        loads.append((path, kw["val_fraction"]))
        return load_corpus(path, **kw)

    monkeypatch.setattr(corpus_module, "load_corpus", counted)
    out = tmp_path / "cmp"
    assert main(["compare", "--data", corpus, *TINY, "--grid", "val_fraction=0.1,0.5",
                 "--seeds", "0,1", "--out", str(out)]) == 0
    assert sorted(loads) == [(corpus, 0.1), (corpus, 0.5)]  # once per split, not per seed
    described = {}
    for fraction in (0.1, 0.5):
        expected = load_corpus(corpus, val_fraction=fraction).describe()
        for seed in (0, 1):
            log = json.loads((out / "runs" / f"val_fraction={fraction}-s{seed}" /
                              "log.json").read_text())
            assert log["config"]["val_fraction"] == fraction
            assert log["corpus"] == expected
        described[fraction] = expected
    assert described[0.1] != described[0.5]

    # a second compare reuses the finished runs; one that records another split than its
    # config's (as the runs of the old compare did) is refused before anything trains
    loads.clear()
    assert main(["compare", "--data", corpus, *TINY, "--grid", "val_fraction=0.1,0.5",
                 "--seeds", "0,1", "--out", str(out), "--no-train"]) == 0
    assert loads == []  # summarising saved runs needs no data
    run = out / "runs" / "val_fraction=0.5-s1" / "log.json"
    log = json.loads(run.read_text())
    before = run.read_text()
    base_split = load_corpus(corpus).describe()
    run.write_text(json.dumps({**log, "corpus": base_split}))

    def no_training(cfg, **kw):
        raise AssertionError(f"{cfg.out} trained although its run is saved")

    monkeypatch.setattr("energy_attn.training.loop.train", no_training)
    capsys.readouterr()
    assert main(["compare", "--data", corpus, *TINY, "--grid", "val_fraction=0.1,0.5",
                 "--seeds", "0,1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(run) in err and base_split in err and "val_fraction=0.5-s0" not in err
    run.write_text(before)
    assert main(["compare", "--data", corpus, *TINY, "--grid", "val_fraction=0.1,0.5",
                 "--seeds", "0,1", "--out", str(out)]) == 0
