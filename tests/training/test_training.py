import json
import math
import os
import shutil
import subprocess
import sys
import zlib
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from energy_attn.cli import main
from energy_attn.training.corpus import CorpusError, load_corpus, stdlib_files
from energy_attn.training.loop import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """~6 kB of English and Python-like text (deterministic)."""
    text = ("the energy of attention is a sum of log sum exp terms over keys and queries "
            "def step(x): return x - eta * grad(x)\n")
    words = text.split(" ")
    g = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(words), (1200,), generator=g).tolist()
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(" ".join(words[i] for i in picks))
    return path


def tiny(text_file, **kw):
    base = TrainConfig(data=str(text_file), n_layer=1, n_head=2, d_model=16, context=16,
                       batch=8, steps=20, lr=1e-2, warmup=2, eval_interval=10, eval_batches=2,
                       stability_batch=2, val_fraction=0.1)
    return replace(base, **kw)


def test_twenty_steps_lower_the_loss(text_file, tmp_path):
    log = train(tiny(text_file, out=str(tmp_path)), progress=False)
    assert [e["step"] for e in log["eval"]] == [0, 10, 20]
    assert log["eval"][-1]["val_loss"] < log["eval"][0]["val_loss"] - 0.5
    first, last = log["train"][0]["loss"], log["train"][-1]["loss"]
    assert last < first
    for name in ("log.json", "log.csv", "loss.png", "ckpt.pt"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "log.json").read_text())
    assert saved["summary"]["steps"] == 20 and saved["config"]["data"] == str(text_file)
    assert log["eval"][1]["attn_kl"] > 0  # the attention maps moved
    csv_rows = (tmp_path / "log.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 21  # header, step 0 (validation only), 20 steps


@pytest.mark.parametrize("kw", [
    {"optimizer": "adamw", "block": "nag", "dropout": 0.1},
    {"optimizer": "aiadam", "attention_norm": "own", "block": "light2nd1st"},
])
def test_resume_reproduces_the_uninterrupted_run(text_file, tmp_path, kw):
    cfg = tiny(text_file, steps=12, eval_interval=4, **kw)
    full = train(replace(cfg, out=str(tmp_path / "full")), progress=False)
    part = replace(cfg, out=str(tmp_path / "part"))
    first = train(part, stop_at=6, progress=False)
    assert first["train"][-1]["step"] == 6
    ck = torch.load(tmp_path / "part" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 6
    resumed = train(part, resume=True, progress=False)
    assert [t["loss"] for t in resumed["train"]] == [t["loss"] for t in full["train"]]
    assert [e["val_loss"] for e in resumed["eval"]] == [e["val_loss"] for e in full["eval"]]
    assert [e["attn_kl"] for e in resumed["eval"]] == [e["attn_kl"] for e in full["eval"]]


def test_resume_refuses_a_different_model(text_file, tmp_path):
    cfg = tiny(text_file, steps=4, out=str(tmp_path))
    train(cfg, stop_at=2, progress=False)
    with pytest.raises(ValueError, match="d_model"):
        train(replace(cfg, d_model=32), resume=True, progress=False)


def test_runs_saved_before_a_field_existed_resume_and_are_reused(text_file, tmp_path, capsys):
    # A log or checkpoint written before a TrainConfig field was added lacks it: the field's
    # default applies ("attention_norm" stands for such a field; "dropout" is one a resume may
    # not change), instead of a refused resume and a retrained run.
    from energy_attn.training.compare import run_grid

    run = tmp_path / "runs" / "base-s0"  # where run_grid keeps the one run of this grid
    cfg = tiny(text_file, steps=4, eval_interval=2, seed=0, out=str(run))
    train(cfg, stop_at=2, progress=False)
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    del ck["config"]["attention_norm"], ck["config"]["dropout"]
    torch.save(ck, run / "ckpt.pt")
    log = train(cfg, resume=True, progress=False)
    assert log["resumes"][-1]["changed"] == {} and log["summary"]["steps"] == 4
    saved = json.loads((run / "log.json").read_text())
    del saved["config"]["attention_norm"], saved["config"]["dropout"]
    (run / "log.json").write_text(json.dumps(saved))
    capsys.readouterr()
    logs = run_grid(cfg, [{}], [0], tmp_path, progress=False, train_missing=False)
    assert "reusing" in capsys.readouterr().err and len(logs["base"]) == 1


def test_bad_data_paths_and_empty_corpora(tmp_path, capsys):
    with pytest.raises(CorpusError, match="no such file"):
        load_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(tmp_path / "empty")
    (tmp_path / "empty" / "blank.txt").write_text("")
    (tmp_path / "empty" / "image.bin").write_bytes(b"\x00\x01\x02" * 10)
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(tmp_path / "empty")
    (tmp_path / "small.txt").write_text("tiny text")
    with pytest.raises(CorpusError, match="context"):
        load_corpus(tmp_path / "small.txt", min_bytes=65)
    # the command line turns them into a message and exit status 2
    assert main(["train", "--data", str(tmp_path / "missing.txt"), "--steps", "1"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "empty"), "--steps", "1"]) == 2
    assert "empty" in capsys.readouterr().err


def test_split_is_by_file_name(tmp_path):
    names = [f"f{i:02d}.txt" for i in range(60)]
    for n in reversed(names):  # creation order must not matter
        (tmp_path / n).write_text(n * 20)
    corpus = load_corpus(tmp_path, val_fraction=0.2)
    is_val = [zlib.crc32(n.encode()) % 1000 < 200 for n in names]
    assert 0 < corpus.num_val_files == sum(is_val) < 60
    expected_val = b"\n\n".join(n.encode() * 20 for n, v in zip(names, is_val) if v)
    assert bytes(corpus.val.tolist()) == expected_val
    # a single file is split by bytes instead
    one = load_corpus(tmp_path / "f00.txt", val_fraction=0.25)
    assert one.train.numel() + one.val.numel() == 7 * 20 and one.val.numel() == 35


def test_stdlib_corpus_is_deterministic_python():
    root, files = stdlib_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert "os.py" in rel and not any("site-packages" in r for r in rel)


@pytest.mark.slow
def test_torchrun_two_process_gloo_smoke(text_file, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "energy_attn.cli", "train", "--data", str(text_file), "--n-layer", "1",
           "--n-head", "2", "--d-model", "16", "--context", "16", "--batch", "4", "--steps", "4",
           "--eval-interval", "2", "--eval-batches", "2", "--optimizer", "aiadam",
           "--attention-norm", "own", "--val-fraction", "0.1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((out / "log.json").read_text())
    assert log["world_size"] == 2 and log["summary"]["steps"] == 4
    assert (out / "ckpt.pt").is_file()


def test_compare_writes_one_table_and_figure(text_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--data", str(text_file), "--n-layer", "1", "--n-head", "2",
            "--d-model", "16", "--context", "16", "--batch", "4", "--steps", "4",
            "--eval-interval", "2", "--eval-batches", "1", "--val-fraction", "0.1",
            "--grid", "block:optimizer=mha:adamw,nag:aiadam", "--seeds", "0,1",
            "--target-loss", "100", "--quiet", "--out", str(out)]
    assert main(args) == 0
    table = (out / "compare.md").read_text()
    assert "block=mha-optimizer=adamw" in table and "block=nag-optimizer=aiadam" in table
    assert "2/2" in table  # both seeds reach the (trivial) target
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["seeds"] for r in rows] == [2, 2] and (out / "compare.png").is_file()
    assert rows[0]["steps_to_target"] == 0  # the step-0 validation is already below 100
    # a second call reuses the finished runs
    capsys.readouterr()
    assert main([*args, "--no-train"]) == 0
    assert "reusing" in capsys.readouterr().err


def test_grid_parsing():
    from energy_attn.training.compare import parse_grid

    grid = parse_grid(["optimizer:lr=adamw:1e-3,aiadam:3e-3", "block=mha,nag"], TrainConfig)
    assert grid[0] == {"optimizer": "adamw", "lr": 1e-3, "block": "mha"} and len(grid) == 4
    with pytest.raises(ValueError, match="not a TrainConfig field"):
        parse_grid(["colour=red"], TrainConfig)
    with pytest.raises(ValueError, match="needs 2 parts"):
        parse_grid(["optimizer:lr=adamw"], TrainConfig)


def test_energy_attention_options_reach_the_model():
    # --attention energy used to build GPTs with num_steps=1, i.e. plain softmax attention.
    from energy_attn.training.loop import build_model

    model = build_model(TrainConfig(attention="energy", attn_steps=3, attn_step_size=0.5,
                                    n_layer=1, n_head=2, d_model=16, context=16))
    (attn,) = [m for m in model.modules() if type(m).__name__ == "MultiHeadSelfAttention"]
    assert (attn.attention, attn.num_steps, attn.step_size) == ("energy", 3, 0.5)
    x = torch.randint(0, 256, (2, 16))
    one = build_model(TrainConfig(attention="energy", attn_steps=1, n_layer=1, n_head=2,
                                  d_model=16, context=16))
    one.load_state_dict(model.state_dict())
    assert not torch.allclose(model(x)[0], one(x)[0])  # the descent steps change the output


@pytest.mark.parametrize("field, value", [
    ("grad_clip", -1.0), ("grad_clip", float("nan")), ("min_lr_ratio", -0.1),
    ("min_lr_ratio", 1.5), ("weight_decay", -0.1), ("beta1", 1.0), ("beta2", -0.5),
    ("beta1", float("nan")), ("lr", float("inf")), ("val_fraction", 0.0),
    ("val_fraction", 1.0), ("val_fraction", float("nan"))])
def test_config_rejects_out_of_range_optimizer_settings(field, value, tmp_path, capsys):
    # grad_clip=-1 used to pass (it is truthy) and clip_grad_norm_ flipped the gradient.
    # val_fraction=0 passed the config (only load_corpus checked it): a compare grid over it
    # trained the other variants first, and with a preloaded corpus it was never checked.
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})
    flag = "--" + field.replace("_", "-")
    assert main(["train", flag, str(value), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"error: {field} must" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("seed", [-(2**63), -1, 0, 10**13, 2**64 - 1])
def test_every_accepted_seed_draws_batches(seed):
    # a seed above ~9e9 (or below -9e9) overflowed the generator seed of get_batch: the run
    # failed at its first step with "Overflow when unpacking long long"
    from energy_attn.training.loop import get_batch

    data = torch.arange(100, dtype=torch.uint8)
    cfg = TrainConfig(seed=seed, context=8, batch=3)
    x, y = get_batch(data, cfg, 7, 1, "cpu")
    assert x.shape == y.shape == (3, 8) and torch.equal(x[:, 1:], y[:, :-1])
    assert int(x[:, 0].max()) <= 100 - 9  # the window ends inside the data
    if seed in (-1, 0):  # the seeds that worked before keep their batches
        gen = torch.Generator().manual_seed((seed * 1_000_003 + 7) * 1_009 + 1)
        assert torch.equal(x[:, 0], torch.randint(0, 92, (3,), generator=gen).to(x.dtype))


def test_config_keeps_plain_values_and_names_a_field_of_the_wrong_type(text_file, tmp_path):
    # data/out as pathlib.Path trained every step, then failed writing log.json ("PosixPath is
    # not JSON serializable"), and the checkpoint could not be loaded to resume
    # (weights_only); numpy scalars broke log.json the same way; steps=2.5 ran 3 steps
    # without the final validation; batch=2.0 failed inside torch.linspace.
    np = pytest.importorskip("numpy")
    cfg = tiny(text_file, data=text_file, out=tmp_path / "run", device=torch.device("cpu"),
               steps=np.int64(2), eval_interval=2, lr=np.float32(0.5), warmup=0)
    assert (cfg.data, cfg.out, cfg.device) == (str(text_file), str(tmp_path / "run"), "cpu")
    assert type(cfg.steps) is int and type(cfg.lr) is float and cfg.lr == 0.5
    train(cfg, stop_at=1, progress=False)
    log = train(cfg, resume=True, progress=False)
    assert log["summary"]["steps"] == 2
    assert json.loads((tmp_path / "run" / "log.json").read_text())["config"]["out"] == cfg.out
    for field, value in (("steps", 2.5), ("batch", 2.0), ("warmup", True), ("lr", "3e-3"),
                         ("amp", 1), ("block", None), ("data", 3), ("device", 0)):
        with pytest.raises(TypeError, match=field):
            TrainConfig(**{field: value})


def test_stop_at_must_be_past_the_start(text_file, tmp_path, capsys):
    # --stop-at -2 (or 0) ran no step and wrote no checkpoint, so a later --resume started a
    # new run from the defaults; a resume with --stop-at at or before the checkpoint's step
    # ran nothing and dropped the validation at that step ("final validation loss (step 0)")
    cfg = tiny(text_file, steps=6, eval_interval=4, out=str(tmp_path / "run"))
    for stop_at in (0, -2):
        with pytest.raises(ValueError, match="stop_at must be >= 1"):
            train(cfg, stop_at=stop_at, progress=False)
    with pytest.raises(TypeError, match="stop_at"):
        train(cfg, stop_at=2.0, progress=False)
    assert not (tmp_path / "run").exists()
    train(cfg, stop_at=3, progress=False)
    before = (tmp_path / "run" / "log.json").read_text()
    for stop_at in (2, 3):
        with pytest.raises(ValueError, match=f"stop_at={stop_at}: give --stop-at > 3"):
            train(cfg, resume=True, stop_at=stop_at, progress=False)
    assert (tmp_path / "run" / "log.json").read_text() == before  # the run is left alone
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--stop-at", "3"]) == 2
    assert "give --stop-at > 3" in capsys.readouterr().err
    log = train(cfg, resume=True, stop_at=5, progress=False)
    assert [e["step"] for e in log["eval"]] == [0, 4, 5] and log["eval"][-1]["at_stop"]


def test_divergence_keeps_the_last_finite_checkpoint(text_file, tmp_path, capsys):
    # the diverged step used to be checkpointed: NaN weights replaced the last good checkpoint,
    # so a resume with a lower lr (a change a resume allows) diverged again at once
    cfg = tiny(text_file, grad_clip=0.0, ckpt_interval=10, out=str(tmp_path / "run"))
    full = train(replace(cfg, out=None), progress=False)
    train(cfg, stop_at=4, progress=False)  # checkpointed at step 4
    log = train(replace(cfg, lr=1e4), resume=True, progress=False)
    bad = log["diverged_at"]
    assert bad is not None and 4 < bad < 10 and log["summary"]["diverged_at"] == bad
    assert not math.isfinite(log["train"][-1]["loss"]) and log["eval"][-1]["step"] == bad
    assert "ckpt.pt keeps step 4" in capsys.readouterr().err
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 4
    assert all(v.isfinite().all() for v in ck["model"].values() if v.is_floating_point())
    again = train(cfg, resume=True, progress=False)  # back to the run's own lr
    assert again.get("diverged_at") is None
    assert [t["loss"] for t in again["train"]] == [t["loss"] for t in full["train"]]


def test_an_interrupted_write_leaves_the_previous_log_and_checkpoint_whole(text_file, tmp_path,
                                                                          monkeypatch):
    # log.json was written in place: interrupted mid-write, it was left truncated, and
    # `energy-attn compare`, which reads it to reuse finished runs, failed on it
    run = tmp_path / "run"
    cfg = tiny(text_file, steps=4, eval_interval=2, out=str(run))
    train(cfg, progress=False)
    before = {name: (run / name).read_bytes() for name in ("log.json", "ckpt.pt")}

    def half_then_interrupt(first, *args, **kwargs):  # (path, text) or (obj, path)
        path = first if isinstance(first, Path) else args[0]
        Path(path).write_bytes(b'{"half": ')
        raise KeyboardInterrupt

    # the checkpoint at step 6, then (with the checkpoint written) the log at the end
    for target, name, whole in ((torch, "save", ("ckpt.pt", "log.json")),
                                (Path, "write_text", ("log.json",))):
        with monkeypatch.context() as m:
            m.setattr(target, name, half_then_interrupt)
            with pytest.raises(KeyboardInterrupt):
                train(replace(cfg, steps=6), resume=True, progress=False)
        assert all((run / n).read_bytes() == before[n] for n in whole), name
    assert json.loads((run / "log.json").read_text())["summary"]["steps"] == 4
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 6


def test_resume_without_a_checkpoint_restarts_with_the_logged_settings(text_file, tmp_path,
                                                                       capsys):
    # a run that diverged before its first checkpoint (or whose ckpt.pt was deleted) has only
    # log.json: --resume started a new run from the defaults (the 4x128 GPT on the standard
    # library) and overwrote that log
    from argparse import Namespace

    from energy_attn.training.train import resolve_config

    run = str(tmp_path / "run")
    cfg = tiny(text_file, lr=1e4, grad_clip=0.0, warmup=0, ckpt_interval=10, out=run)
    assert train(cfg, progress=False)["diverged_at"] < 10
    assert not (tmp_path / "run" / "ckpt.pt").exists()
    assert resolve_config(Namespace(out=run, lr=1e-2, resume=True)) == replace(cfg, lr=1e-2)
    assert "with the settings of its log.json" in capsys.readouterr().err
    assert main(["train", "--out", run, "--resume", "--lr", "1e-2"]) == 0
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["config"] == asdict(replace(cfg, lr=1e-2)) and log.get("diverged_at") is None


def test_resume_applies_the_optimizer_settings_it_changes(text_file, tmp_path):
    # weight_decay, beta1/beta2 and aiadam's gamma may change on a resume (and were logged as
    # changed), but opt.load_state_dict put the checkpoint's values back: nothing changed
    cfg = tiny(text_file, steps=6, eval_interval=3, optimizer="aiadam", out=str(tmp_path / "a"))
    train(cfg, stop_at=3, progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    same = train(cfg, resume=True, progress=False)
    new = {"weight_decay": 0.5, "beta1": 0.5, "beta2": 0.9, "gamma": -2.0}
    changed = train(replace(cfg, out=str(tmp_path / "b"), **new), resume=True, progress=False)
    assert changed["resumes"][-1]["changed"] == {k: [getattr(cfg, k), v] for k, v in new.items()}
    groups = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"]), g["gamma"]) for g in groups] == [
        (0.5, (0.5, 0.9), -2.0), (0.0, (0.5, 0.9), -2.0)]  # the second group: no decay
    assert changed["train"][:3] == same["train"][:3]
    assert changed["train"][3]["loss"] == same["train"][3]["loss"]  # forward before any update
    assert changed["train"][4]["loss"] != same["train"][4]["loss"]


def test_a_resume_logs_a_change_of_the_number_of_processes(text_file, tmp_path):
    # resuming a 2-process run in 1 process halves the global batch; the log said nothing
    cfg = tiny(text_file, steps=4, eval_interval=2, out=str(tmp_path / "run"))
    train(cfg, stop_at=2, progress=False)
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ck["world_size"] == 1
    ck["world_size"] = 2  # as if saved under torchrun --nproc-per-node 2
    torch.save(ck, tmp_path / "run" / "ckpt.pt")
    log = train(cfg, resume=True, progress=False)
    assert log["resumes"] == [{"step": 2, "changed": {"world_size": [2, 1]}}]
