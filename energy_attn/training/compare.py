"""``energy-attn compare``: a grid of training variants × seeds, one table and one figure.

``--grid KEY=V1,V2`` (repeatable; any :class:`TrainConfig` field) spans the variants, their
Cartesian product; ``--seeds`` the seeds. Each run writes ``OUT/runs/<variant>-s<seed>/`` (a run
whose log is already complete is reused, an interrupted one resumes from its checkpoint) and
trains on the corpus of its own ``data`` and ``val_fraction`` (loaded once per distinct pair; a
finished run whose log records another corpus is an error, not reused). The
summary is ``OUT/compare.json``, ``compare.csv``, ``compare.md`` (mean ± std over the seeds
whose training did not diverge, see :func:`summarize_runs`) and ``compare.png`` (validation loss
vs step and vs training wall-clock, mean ± std band).
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

__all__ = ["parse_grid", "run_grid", "summarize_runs"]


def parse_grid(specs, config_cls):
    """``["block=mha,nag", "lr=1e-3,3e-3"]`` -> list of dicts (the Cartesian product).

    Keys joined by ``:`` vary together: ``"optimizer:gamma=adamw:1,aiadam:-1"`` is one axis.
    """
    types = {f.name: f.type for f in fields(config_cls)}
    axes = []
    for spec in specs or []:
        key, sep, values = spec.partition("=")
        keys = [k.strip().replace("-", "_") for k in key.split(":")]
        if not sep or not values:
            raise ValueError(f"--grid must look like KEY=V1,V2, got {spec!r}")
        for k in keys:
            if k not in types or k in ("seed", "out"):
                raise ValueError(f"--grid key {k!r} is not a TrainConfig field (or is seed/out)")
        axis = []
        for value in values.split(","):
            parts = value.split(":")
            if len(parts) != len(keys):
                raise ValueError(f"--grid {spec!r}: value {value!r} needs {len(keys)} parts")
            axis.append(tuple((k, _grid_value(k, str(types[k]), v)) for k, v in zip(keys, parts)))
        axes.append(axis)
    return [dict(kv for part in combo for kv in part)
            for combo in itertools.product(*axes)] if axes else [{}]


# TrainConfig fields that do not change what a run trains (the thread count may change float
# rounding only): a finished run is reused across them.
_NOT_RESULTS = ("out", "threads", "log_interval")


def _grid_value(key: str, typ: str, text: str):
    """One ``--grid`` value converted to its field's type; ValueError naming the key."""
    if typ == "bool":
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--grid {key}={text!r}: expected true or false")
        return text.lower() in ("true", "1")
    try:
        return {"int": int, "float": float}.get(typ, str)(text)
    except ValueError:
        raise ValueError(f"--grid {key}={text!r}: expected an {typ}") from None


def variant_name(variant: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in variant.items()) or "base"


def run_grid(base, variants, seeds, out: Path, progress=True, train_missing=True):
    """Train every (variant, seed); returns ``{variant name: [log, ...]}``.

    With ``train_missing=False`` only the finished runs already under ``out`` are collected.
    """
    from .corpus import load_corpus
    from .loop import TrainConfig, check_config, train

    # Check every run's settings before the first step: a bad value fails now, not after
    # the runs before it have trained.
    planned = []
    for variant in variants:
        name = variant_name(variant)
        try:
            cfgs = [replace(base, **variant, seed=seed, out=str(out / "runs" / f"{name}-s{seed}"))
                    for seed in seeds]
            if train_missing:
                check_config(cfgs[0])
        except ValueError as err:
            raise ValueError(f"--grid variant {name}: {err}") from None
        planned.append((name, list(zip(seeds, cfgs))))
    corpora = {}
    if train_missing:
        # each run trains on its own config's data and val_fraction: one corpus per distinct
        # pair, so a grid that varies neither loads it once
        need = {}
        for _, runs in planned:
            for _, cfg in runs:
                key = (cfg.data, cfg.val_fraction)
                need[key] = max(need.get(key, 0), cfg.context + 1)
        for (data, val_fraction), min_bytes in need.items():
            corpus = load_corpus(data, val_fraction=val_fraction, min_bytes=min_bytes)
            corpora[data, val_fraction] = corpus
            print(corpus.describe(), file=sys.stderr)
    reused, stale = {}, []
    for _, runs in planned:
        for _, cfg in runs:
            done = Path(cfg.out) / "log.json"
            if not done.exists():
                continue
            log = json.loads(done.read_text())
            finished = log["summary"]["steps"] == cfg.steps or log.get("diverged_at")
            # the log's settings as a TrainConfig: fields added since take their defaults
            same = _settings(TrainConfig.from_dict(log["config"])) == _settings(cfg)
            if finished and same:
                reused[cfg.out] = log
                # (a log that records no corpus cannot be checked; --no-train loads none)
                wanted = corpora.get((cfg.data, cfg.val_fraction))
                had = log.get("corpus")
                if wanted is not None and had is not None and had != wanted.describe():
                    stale.append(f"{done} records {had!r}, its config loads "
                                 f"{wanted.describe()!r}")
    if stale:  # e.g. a run of a compare that gave every variant the base's split
        raise ValueError("finished runs trained on another corpus than their config's (remove "
                         "their folders to train them again): " + "; ".join(stale))
    logs = {}
    for name, runs in planned:
        for seed, cfg in runs:
            if cfg.out in reused:
                logs.setdefault(name, []).append(reused[cfg.out])
                print(f"[{name} seed {seed}] reusing {Path(cfg.out) / 'log.json'}",
                      file=sys.stderr)
                continue
            if not train_missing:
                print(f"[{name} seed {seed}] missing (not trained: --no-train)", file=sys.stderr)
                continue
            print(f"[{name} seed {seed}]", file=sys.stderr)
            logs.setdefault(name, []).append(train(cfg, corpus=corpora[cfg.data, cfg.val_fraction],
                                                   resume=True, progress=progress))
    return logs


def _settings(cfg) -> dict:
    """What a run's results depend on, as JSON reads it back (tuples become lists)."""
    return json.loads(json.dumps({**asdict(cfg), **dict.fromkeys(_NOT_RESULTS)}))


def _mean_std(xs):
    """Mean and sample std of the measured values (None: not measured); (None, None) when
    there are none, (nan, nan) when one of them is not finite."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    if not all(math.isfinite(x) for x in xs):
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _reach(log, target):
    """(step, training seconds) of the first validation at or below ``target``, or None."""
    for e in log["eval"]:
        if e["val_loss"] <= target:
            return e["step"], e["time"]
    return None


SUMMARY_KEYS = ("final_val_loss", "best_val_loss", "median_step_ms", "train_time",
                "mean_attn_kl")


def summarize_runs(logs: dict, target=None, extra_keys=()) -> list[dict]:
    """One row per variant (``logs``: ``{variant name: [run log, ...]}``, one log per seed).

    ``seeds`` counts the runs and ``diverged`` those whose training loss became non-finite
    (training stopped there; the log's ``diverged_at``). Every mean ± sample std — the
    :data:`SUMMARY_KEYS`, ``extra_keys`` (further numeric entries of the run summaries, e.g.
    accuracy), steps and seconds to ``target``, mean α — is over the runs that did *not*
    diverge; it is None (``–`` in the table) when every run diverged. A run whose loss grew
    huge but stayed finite is not diverged and is averaged in. ``reached`` is ``"k/n"`` over
    all n runs: k runs that did not diverge and validated at or below ``target`` (a diverged
    run never counts as reaching it).
    """
    rows = []
    for name, runs in logs.items():
        kept = [r for r in runs if r.get("diverged_at") is None]
        row = {"variant": name, "seeds": len(runs)}
        for key in (*SUMMARY_KEYS, *extra_keys):
            row[key], row[key + "_std"] = _mean_std([r["summary"][key] for r in kept])
        row["diverged"] = len(runs) - len(kept)
        alphas = [t["alpha"] for r in kept for t in r["train"] if "alpha" in t]
        row["mean_alpha"] = statistics.fmean(alphas) if alphas else None
        if target is not None:
            hits = [h for h in (_reach(r, target) for r in kept) if h is not None]
            row["reached"] = f"{len(hits)}/{len(runs)}"
            row["steps_to_target"], row["steps_to_target_std"] = _mean_std([h[0] for h in hits])
            row["time_to_target"], row["time_to_target_std"] = _mean_std([h[1] for h in hits])
        rows.append(row)
    return rows


def _fmt(m, s, digits=4):
    if m is None:
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(rows, target=None) -> str:
    head = ["variant", "seeds", "diverged", "final val loss", "best val loss", "ms/step", "train s",
            "attn KL"]
    if target is not None:
        head += [f"reached {target}", "steps to target", "s to target"]
    if any(r["mean_alpha"] is not None for r in rows):
        head.append("mean α")
    if "final_val_acc" in rows[0]:
        head.append("final val acc")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], str(r["seeds"]), str(r["diverged"]),
                 _fmt(r["final_val_loss"], r["final_val_loss_std"]),
                 _fmt(r["best_val_loss"], r["best_val_loss_std"]),
                 _fmt(r["median_step_ms"], r["median_step_ms_std"], 1),
                 _fmt(r["train_time"], r["train_time_std"], 1),
                 _fmt(r["mean_attn_kl"], r["mean_attn_kl_std"], 5)]
        if target is not None:
            cells += [r["reached"], _fmt(r["steps_to_target"], r["steps_to_target_std"], 0),
                      _fmt(r["time_to_target"], r["time_to_target_std"], 1)]
        if "mean α" in head:
            cells.append("–" if r["mean_alpha"] is None else f"{r['mean_alpha']:.3f}")
        if "final val acc" in head:
            cells.append(_fmt(r["final_val_acc"], r["final_val_acc_std"], 3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_runs(logs: dict, path: Path, title: str = "") -> bool:
    """Validation loss vs step and vs training wall-clock (mean ± std over the seeds that did not
    diverge; the legend counts the diverged ones); False (and a message on stderr) when
    matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print(f'{path.name} skipped: matplotlib is not installed (pip install "energy-attn[viz]")',
              file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = compare_figure(logs, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def compare_figure(logs: dict, title: str = ""):
    """The figure of :func:`plot_runs` (needs matplotlib): two panels sharing the loss axis, one
    legend below both, so that no curve is hidden behind it however many variants there are."""
    import matplotlib.pyplot as plt
    import numpy as np

    ncol = 1 if len(logs) < 4 else 2
    rows = -(-len(logs) // ncol)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4 + 0.2 * rows), sharey=True)
    for name, runs in logs.items():
        diverged = sum(r.get("diverged_at") is not None for r in runs)
        runs = [r for r in runs if r.get("diverged_at") is None]  # curves of finished runs
        if not runs:
            continue
        if diverged:
            name = f"{name} ({diverged} diverged, not shown)"
        n = min(len(r["eval"]) for r in runs)
        steps = np.array([e["step"] for e in runs[0]["eval"][:n]])
        loss = np.array([[e["val_loss"] for e in r["eval"][:n]] for r in runs])
        t = np.array([[e["time"] for e in r["eval"][:n]] for r in runs]).mean(0)
        m, s = loss.mean(0), loss.std(0)
        for ax, xs in ((a1, steps), (a2, t)):
            (line,) = ax.plot(xs, m, label=name)
            ax.fill_between(xs, m - s, m + s, color=line.get_color(), alpha=0.2)
    a1.set(xlabel="step", ylabel="validation loss")
    a2.set(xlabel="training wall-clock (s, mean over seeds)")
    finite = [e["val_loss"] for runs in logs.values() for r in runs for e in r["eval"]
              if math.isfinite(e["val_loss"])]
    lo = min(finite)
    first = [r["eval"][1]["val_loss"] for runs in logs.values() for r in runs
             if len(r["eval"]) > 1 and r.get("diverged_at") is None]
    start = [r["eval"][0]["val_loss"] for runs in logs.values() for r in runs]
    if first:  # the step-0 loss squashes the curves: start at the 1st eval (never above step 0)
        top = min(max(first), max(start))
        a1.set_ylim(lo - 0.05 * (top - lo), top)
    fig.suptitle(title or "validation loss, mean ± std over seeds")
    handles, labels = a1.get_legend_handles_labels()
    legend = fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8,
                        frameon=False)
    fig.canvas.draw()  # the legend's height, then the panels laid out above it
    height = legend.get_window_extent().height / fig.bbox.height
    fig.tight_layout(rect=(0, height + 0.01, 1, 1))
    return fig


def write_summary(logs, rows, out: Path, target=None, command=None, plot=True):
    """``compare.{json,csv,md}`` and (``plot``) ``compare.png`` under ``out``; returns the
    markdown table. ``compare.json``'s ``machine`` is the one the runs recorded (this machine
    for logs that record none), so a table re-rendered elsewhere still names where they ran."""
    from .loop import machine_info

    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(logs.values()))[0]
    machine = first.get("machine") or machine_info(first["config"]["device"])
    (out / "compare.json").write_text(json.dumps(
        {"command": command, "machine": machine, "target_loss": target,
         "rows": rows}, indent=1))
    keys = list(rows[0])
    with open(out / "compare.csv", "w") as f:
        f.write(",".join(keys) + "\n")
        f.writelines(",".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + "\n"
                     for r in rows)
    table = markdown_table(rows, target)
    (out / "compare.md").write_text(table + "\n")
    if plot:
        plot_runs(logs, out / "compare.png")
    return table


def _run(args) -> int:
    from .._utils import check_seed
    from ..cli import check_out_dir
    from .corpus import CorpusError
    from .loop import TrainConfig
    from .train import config_from_args

    try:
        base = config_from_args(args)
        variants = parse_grid(args.grid, TrainConfig)
        seeds = []
        for text in args.seeds.split(","):
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"--seeds must be comma-separated integers, got "
                                 f"{args.seeds!r}") from None
            seeds.append(check_seed("--seeds", value))
        out = Path(getattr(args, "out", None) or "compare-out")
        check_out_dir(out)
        base = replace(base, out=None)
        logs = run_grid(base, variants, seeds, out, progress=not args.quiet,
                        train_missing=not args.no_train)
        if not logs:
            raise ValueError(f"no finished runs under {out}")
    except (CorpusError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = summarize_runs(logs, args.target_loss)
    table = write_summary(logs, rows, out, args.target_loss, " ".join(sys.argv), plot=False)
    png = plot_runs(logs, out / "compare.png")
    print(table)
    print(f"wrote {out}/compare.{{json,csv,md{',png' if png else ''}}}")
    return 0


def add_parser(subparsers) -> None:
    from .train import add_train_arguments

    p = subparsers.add_parser(
        "compare", help="train a grid of variants x seeds; one table and one figure",
        description="Runs every combination of the --grid values for each seed (the other "
                    "options as for `energy-attn train`), then writes OUT/compare.{json,csv,md,"
                    "png}: validation loss vs step and vs wall-clock, mean ± std over the "
                    "seeds that did not diverge.")
    add_train_arguments(p, {"out": "output directory: compare.{json,csv,md,png} and runs/ (one "
                                   "run directory per variant and seed) (default: compare-out)"})
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                   help="a TrainConfig field and its values (repeatable; product of all)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--target-loss", type=float, default=None,
                   help="report steps and wall-clock to reach this validation loss")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-train", action="store_true",
                   help="only summarise the finished runs already under --out")
    p.set_defaults(func=_run)
