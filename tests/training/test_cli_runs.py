"""``energy-attn train/compare/check`` as a user runs them: subprocesses on a tiny corpus."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from energy_attn.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = ["--n-layer", "1", "--n-head", "2", "--d-model", "16", "--context", "16", "--batch", "4",
        "--eval-batches", "1", "--val-fraction", "0.1", "--stability-batch", "2"]


def cli(*args, cwd, hide_matplotlib=False):
    """Run ``energy-attn ARGS`` in ``cwd``; optionally as if matplotlib were not installed."""
    code = "import sys\n"
    if hide_matplotlib:
        code += "sys.modules['matplotlib'] = None\n"
    code += "from energy_attn.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=env)


def log_of(run):
    return json.loads((Path(run) / "log.json").read_text())


def test_resume_extends_a_finished_run_and_refuses_only_model_or_data_changes(corpus, tmp_path,
                                                                             capsys):
    first = cli("train", "--data", corpus, *TINY, "--steps", "6", "--eval-interval", "3",
                "--out", "run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = log_of(tmp_path / "run")
    # no flag repeated: the settings come from the checkpoint; steps and intervals may change
    more = cli("train", "--out", "run", "--resume", "--steps", "10", "--eval-interval", "2",
               "--log-interval", "1", "--threads", "2", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert "resuming" in more.stderr and "steps 6 -> 10" in more.stderr
    assert "2 threads" in more.stderr  # the run header shows the thread count
    log = log_of(tmp_path / "run")
    assert log["summary"]["steps"] == 10 and [t["step"] for t in log["train"]] == list(range(1, 11))
    assert log["train"][:6] == before["train"]  # the first 6 steps are the finished run's
    assert [e["step"] for e in log["eval"]] == [0, 3, 6, 8, 10]
    cfg = log["config"]
    assert (cfg["data"], cfg["d_model"], cfg["steps"], cfg["eval_interval"], cfg["threads"]) == (
        corpus, 16, 10, 2, 2)
    assert log["resumes"] == [{"step": 6, "changed": {"steps": [6, 10], "eval_interval": [3, 2],
                                                      "log_interval": [10, 1],
                                                      "threads": [0, 2]}}]
    # what would change the model or the data is refused, by name (in-process: fails early)
    run = str(tmp_path / "run")
    assert main(["train", "--out", run, "--resume", "--steps", "12", "--d-model", "32",
                 "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "d_model (16 -> 32)" in err and "seed (0 -> 1)" in err
    assert "steps" not in err.split("would change")[0]
    assert main(["train", "--out", run, "--resume", "--steps", "8"]) == 2
    assert "--steps >= 10" in capsys.readouterr().err
    assert main(["train", "--resume", "--steps", "8"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
    assert log_of(run) == log  # refused runs leave the run alone


def test_stop_at_validates_at_the_stop(corpus, tmp_path):
    res = cli("train", "--data", corpus, *TINY, "--steps", "12", "--eval-interval", "4",
              "--stop-at", "6", "--out", "run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    log = log_of(tmp_path / "run")
    assert [e["step"] for e in log["eval"]] == [0, 4, 6] and log["eval"][-1]["at_stop"]
    assert f"final validation loss {log['eval'][-1]['val_loss']:.4f} (step 6)" in res.stdout
    assert main(["train", "--out", str(tmp_path / "run"), "--resume"]) == 0  # finish it
    assert [e["step"] for e in log_of(tmp_path / "run")["eval"]] == [0, 4, 8, 12]


def test_train_without_out_saves_to_a_printed_run_directory(corpus, tmp_path):
    res = cli("train", "--data", corpus, *TINY, "--steps", "2", "--eval-interval", "2",
              cwd=tmp_path, hide_matplotlib=True)
    assert res.returncode == 0, res.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert f"run directory: runs/{run.name}" in res.stderr
    assert f"wrote runs/{run.name}" in res.stdout
    assert {p.name for p in run.iterdir()} == {"ckpt.pt", "log.json", "log.csv"}
    assert "loss.png skipped: matplotlib is not installed" in res.stderr


def test_compare_checks_the_whole_grid_first_and_reports_a_missing_figure(corpus, tmp_path,
                                                                          capsys):
    for grid, named in (("block=mha,nagg", "nagg"), ("n_layer=1,two", "two"),
                        ("device=cpu,gpu", "gpu"), ("n_head:d_model=2:16,3:16", "d_model"),
                        ("beta1=0.9,1.5", "beta1"),
                        ("optimizer:gamma=aiadam:1,aiadam:nan", "gamma")):
        assert main(["compare", "--data", corpus, *TINY, "--steps", "2", "--grid", grid,
                     "--seeds", "0", "--quiet", "--out", str(tmp_path / "cmp")]) == 2
        assert named in capsys.readouterr().err
        assert not (tmp_path / "cmp").exists()  # nothing trained before the error
    res = cli("compare", "--data", corpus, *TINY, "--steps", "2", "--eval-interval", "2",
              "--grid", "block=mha", "--seeds", "0", "--quiet", "--out", "cmp", cwd=tmp_path,
              hide_matplotlib=True)
    assert res.returncode == 0, res.stderr
    assert "wrote cmp/compare.{json,csv,md}" in res.stdout and "png" not in res.stdout
    assert "compare.png skipped: matplotlib is not installed" in res.stderr
    assert not (tmp_path / "cmp" / "compare.png").exists()


def test_check_with_a_bad_device_is_a_clean_error(tmp_path):
    res = cli("check", "--device", "gpu", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--device 'gpu' is not a torch device" in res.stderr


def test_out_paths_threads_and_seeds_are_checked_before_any_work(corpus, tmp_path, capsys):
    # --out naming a file failed (FileExistsError traceback) only at the first checkpoint,
    # after the training; --threads 99999 crashed OpenMP; --seeds a,b did not name --seeds.
    (tmp_path / "afile").write_text("")
    for out in ("afile", "afile/run"):
        for cmd, extra in (("train", []), ("compare", ["--quiet"])):
            assert main([cmd, "--data", corpus, *TINY, "--steps", "2", *extra,
                         "--out", str(tmp_path / out)]) == 2
            err = capsys.readouterr().err
            assert "error: --out" in err and "is a file, not a directory" in err, err
    assert main(["train", "--data", corpus, *TINY, "--steps", "2", "--threads", "99999",
                 "--out", str(tmp_path / "run")]) == 2
    assert "threads must be at most" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["compare", "--data", corpus, *TINY, "--seeds", "a,b",
                 "--out", str(tmp_path / "cmp")]) == 2
    assert "--seeds must be comma-separated integers" in capsys.readouterr().err


def test_compare_help_describes_its_own_out(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: compare-out" in text and "runs/train-DATE-TIME" not in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "runs/train-DATE-TIME" in text and "(default None)" not in text


def test_a_resume_can_turn_amp_off_to_continue_a_cuda_run_on_the_cpu(corpus, tmp_path, capsys):
    # --device may change on a resume, but a run saved with amp (CUDA only) could not continue
    # on the CPU: the command line had --amp and no way to turn it off
    run = str(tmp_path / "run")
    assert main(["train", "--data", corpus, *TINY, "--steps", "4", "--stop-at", "2",
                 "--out", run]) == 0
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    ck["config"].update(amp=True, device="cuda")  # as if saved by a CUDA run with --amp
    torch.save(ck, tmp_path / "run" / "ckpt.pt")
    capsys.readouterr()
    assert main(["train", "--out", run, "--resume", "--device", "cpu"]) == 2
    assert "amp=True needs a CUDA device" in capsys.readouterr().err
    assert main(["train", "--out", run, "--resume", "--device", "cpu", "--no-amp"]) == 0
    log = log_of(run)
    assert log["resumes"] == [{"step": 2, "changed": {"device": ["cuda", "cpu"],
                                                      "amp": [True, False]}}]
    assert log["summary"]["steps"] == 4 and log["config"]["amp"] is False
