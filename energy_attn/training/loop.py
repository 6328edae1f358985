"""The training loop behind ``energy-attn train``: byte-level GPT, checkpoints, DDP, logs.

``train(TrainConfig(...))`` trains :class:`energy_attn.models.GPT` (vocab 256) on a byte corpus
(:func:`energy_attn.training.corpus.load_corpus`) and returns its log. Everything a step
depends on is a function of ``(seed, step, rank)`` or lives in the checkpoint (model, optimizer,
grad scaler, RNG states, the log), so a resumed run reproduces the uninterrupted run's losses
exactly on the same machine.

* Batches: step ``t`` on rank ``r`` draws ``batch`` random windows of ``context + 1`` bytes with a
  generator seeded by ``(seed, t, r)``; under DDP each rank draws its own (global batch
  ``batch · world_size``).
* Validation: a fixed set of ``eval_batches · batch`` windows evenly spaced over the validation
  split (shared out over ranks); run at step 0, every ``eval_interval`` steps, at the end, and
  at a ``stop_at`` stop (that record is marked ``"at_stop"`` and dropped when the run resumes,
  so a resumed log equals the uninterrupted one).
* Resuming: the checkpoint holds the run's config. Settings that would change the model, the
  data or the optimizer state (:data:`RESUME_FIXED`) must match; the others (``steps``, the
  eval/log/checkpoint intervals, ``threads``, ``device``, ``amp``, and the optimizer's
  settings: the learning-rate schedule, ``weight_decay``, ``beta1``/``beta2``, ``grad_clip``,
  aiadam's ``gamma`` and ``attention_norm``) may change and take effect from the resumed
  step, e.g. a larger ``steps`` extends a finished run (the cosine schedule is then stretched
  to the new length). Each resume and what it changed (settings, and the number of processes,
  which changes the global batch) is logged under ``"resumes"``.
* Threads: ``threads > 0`` sets ``torch.set_num_threads`` for the run (restored after). On a
  machine shared with other busy processes, 1 thread avoids OpenMP threads spinning against
  them (like ``OMP_NUM_THREADS=1``).
* Attention-pattern stability: at each validation the attention maps of every attention module
  on a fixed validation batch; ``attn_kl`` is the mean KL(previous ‖ current) over modules,
  heads and query rows.
* Divergence: a non-finite training loss stops the run at that step (validated there; the
  log's ``diverged_at``). That step is not checkpointed (its update made the weights
  non-finite): the checkpoint stays the last one before it, which a resume, e.g. with a lower
  ``lr``, continues from (the warning names its step). A checkpoint of the step just
  before holds the weights that gave the non-finite loss, so a resume from it diverges again.
* Learning rate: linear warm-up for ``warmup`` steps, then cosine decay to ``min_lr_ratio·lr``.
* Time: ``time`` in the log is training wall-clock only (evaluation and checkpoints excluded).

Optimizers: ``adamw`` (``torch.optim.AdamW``) or ``aiadam``
(:class:`energy_attn.optim.AttentionInformedAdam`). Gradient clipping applies to the loss
gradient only.
"""

from __future__ import annotations

import csv
import gc
import importlib
import json
import math
import numbers
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from .._device import check_device
from .._progress import StatusLine, bar
from .._utils import check_seed
from ..optim.attention_informed import AttentionInformedAdam, energy_modules
from .corpus import check_val_fraction, load_corpus

__all__ = ["OPTIMIZER_NAMES", "RESUME_FIXED", "TrainConfig", "check_config", "machine_info",
           "saved_config", "train"]

OPTIMIZER_NAMES = ("adamw", "aiadam")
CHECKPOINT = "ckpt.pt"
_MODEL_FIELDS = ("block", "attention", "attn_steps", "attn_step_size", "n_layer", "n_head",
                 "d_model", "context", "dropout")
# What a resumed run may not change: the model, the data a step or a validation sees, and the
# optimizer (its saved state belongs to one optimizer).
RESUME_FIXED = (*_MODEL_FIELDS, "data", "val_fraction", "seed", "batch", "eval_batches",
                "stability_batch", "optimizer")
CHOICES = {"optimizer": OPTIMIZER_NAMES,
           "block": ("mha", "momen", "nag", "2nd1st", "light2nd1st"),
           "attention": ("softmax", "energy"), "attention_norm": ("loss", "own")}


@dataclass
class TrainConfig:
    """Everything a training run depends on (all of it is saved in the log and checkpoint).

    Attributes:
        data: corpus file or folder (None: the standard library's ``.py`` files).
        out: output folder for ``log.json``, ``log.csv``, ``loss.png``, ``ckpt.pt`` (None: no
            files). ``data`` and ``out`` may be given as ``os.PathLike``; both are kept as
            ``str``.
        block, attention: GPT block variant and attention kind (:class:`GPTConfig`).
        attn_steps, attn_step_size: energy attention's total steps ``T`` (``T − 1`` Hopfield
            descent steps, then the value read-out) and step size ``η``; unused by softmax.
        n_layer, n_head, d_model, context, dropout: GPT size.
        optimizer: ``"adamw"`` or ``"aiadam"``; ``lr``, ``beta1``, ``beta2``,
            ``weight_decay``, ``gamma`` (aiadam's γ), ``attention_norm`` (aiadam: ``"own"``,
            the default, or ``"loss"``; docs/math.md §6) its settings.
        warmup, min_lr_ratio: schedule (module docstring).
        grad_clip: max global norm of the loss gradient (0: off).
        batch, steps: per-rank batch size and number of steps.
        eval_interval, eval_batches: validation every ``eval_interval`` steps over
            ``eval_batches`` batches; ``ckpt_interval`` checkpoints (0: with each validation).
        stability_batch: sequences in the fixed attention-stability batch: the first
            validation windows, so at most ``eval_batches · batch`` are used (0: off).
        seed, device, amp: random seed, torch device (a ``torch.device`` is kept as its
            ``str``), fp16 autocast + GradScaler (CUDA only).
        val_fraction: validation share of the corpus, in ``(0, 1)``.
        log_interval: progress-line interval in steps when stderr is not a terminal.
        threads: CPU threads for this run (``torch.set_num_threads``; 0: torch's default,
            e.g. from ``OMP_NUM_THREADS``); at most ``os.cpu_count()`` (checked by
            :func:`check_config`).

    Integer fields take any integral number, float fields any real number (numpy scalars
    included); they are kept as Python ``int``/``float``, so the log and checkpoint hold
    plain values.

    Raises:
        TypeError: a field of the wrong type (e.g. ``steps=2.5``, ``lr="3e-3"``), naming it.
        ValueError: a value out of its range, naming the field.
    """

    data: str | None = None
    out: str | None = None
    block: str = "mha"
    attention: str = "softmax"
    attn_steps: int = 2
    attn_step_size: float = 1.0
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    context: int = 128
    dropout: float = 0.0
    optimizer: str = "adamw"
    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    gamma: float = 1.0
    attention_norm: str = "own"
    warmup: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    batch: int = 16
    steps: int = 500
    eval_interval: int = 50
    eval_batches: int = 4
    ckpt_interval: int = 0
    stability_batch: int = 4
    seed: int = 0
    device: str = "cpu"
    amp: bool = False
    val_fraction: float = 0.05
    log_interval: int = 10
    threads: int = 0

    def __post_init__(self):
        self._plain_types()
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        check_device(self.device, available=False)
        check_seed("seed", self.seed)
        for name in ("steps", "batch", "eval_interval", "eval_batches", "context"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "ckpt_interval", "stability_batch", "log_interval", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        # written as `not (ok)` so that NaN fails too
        for name in ("lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        check_val_fraction(self.val_fraction)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def _plain_types(self):
        """Each field as the plain type of its annotation, which the log (JSON) and the
        checkpoint (``weights_only`` load) can hold: paths and a ``torch.device`` become
        ``str``, numpy scalars ``int``/``float``. TypeError naming the field otherwise."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "str | None":  # data, out: a path
                if value is not None and not isinstance(value, (str, os.PathLike)):
                    raise TypeError(f"{f.name} must be a path (str or os.PathLike) or None, "
                                    f"got {type(value).__name__}")
                value = None if value is None else os.fspath(value)
            elif f.type == "str":
                if f.name == "device" and isinstance(value, torch.device):
                    value = str(value)
                if not isinstance(value, str):
                    raise TypeError(f"{f.name} must be a str, got {type(value).__name__}")
            elif f.type == "bool":
                if not isinstance(value, bool):
                    raise TypeError(f"{f.name} must be a bool, got {type(value).__name__}")
            elif f.type in ("int", "float"):  # bools are neither here
                kind = numbers.Integral if f.type == "int" else numbers.Real
                if isinstance(value, bool) or not isinstance(value, kind):
                    raise TypeError(f"{f.name} must be a{'n' * (f.type == 'int')} {f.type}, "
                                    f"got {value!r}")
                value = int(value) if f.type == "int" else float(value)
            setattr(self, f.name, value)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def machine_info(device: str = "cpu") -> dict:
    """CPU model and core count (from /proc/cpuinfo), torch version, and the GPU if used."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


# ---------------------------------------------------------------------------- pieces
def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio · lr`` at ``steps``."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    progress = min(max(step - cfg.warmup, 0) / span, 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def get_batch(data: torch.Tensor, cfg: TrainConfig, step: int, rank: int, device):
    """``batch`` random windows for ``(seed, step, rank)``: ``x, y`` long ``[batch, context]``."""
    # modulo 2**64: every seed TrainConfig accepts gives a generator seed (negative ones wrap
    # the same way in torch, so the seeds that fitted already keep their batches)
    key = ((cfg.seed * 1_000_003 + step) * 1_009 + rank) % 2**64
    gen = torch.Generator().manual_seed(key)
    starts = torch.randint(0, data.numel() - cfg.context, (cfg.batch,), generator=gen)
    return _windows(data, starts, cfg.context, device)


def _windows(data, starts, context, device):
    idx = starts[:, None] + torch.arange(context + 1)            # [batch, context + 1]
    chunk = data[idx].long()
    return chunk[:, :-1].to(device), chunk[:, 1:].to(device)


def val_starts(data: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    n = cfg.eval_batches * cfg.batch
    return torch.linspace(0, data.numel() - cfg.context - 1, n).long()


def gpt_config(cfg: TrainConfig):
    """The run's :class:`~energy_attn.models.GPTConfig` (checks the model's settings)."""
    from ..models.gpt import GPTConfig

    return GPTConfig(vocab_size=256, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     d_model=cfg.d_model, context=cfg.context, dropout=cfg.dropout,
                     block=cfg.block, attention=cfg.attention, num_steps=cfg.attn_steps,
                     step_size=cfg.attn_step_size)


def build_model(cfg: TrainConfig):
    from ..models.gpt import GPT

    return GPT(gpt_config(cfg))


def check_config(cfg: TrainConfig) -> None:
    """Everything about ``cfg`` that can be checked before training without data: the device
    exists here, ``amp`` has CUDA, ``threads`` is at most the CPU count (more made OpenMP
    crash), the GPT and its optimizer can be built (on the meta device: no memory). ValueError
    if not."""
    device = check_device(cfg.device)
    if cfg.threads > (os.cpu_count() or 1):
        raise ValueError(f"threads must be at most this machine's CPU count "
                         f"({os.cpu_count()}), got {cfg.threads}")
    if cfg.amp and device.type != "cuda":
        raise ValueError("amp=True needs a CUDA device (fp16 autocast with a GradScaler)")
    try:
        with torch.device("meta"):
            build_optimizer(cfg, build_model(cfg))  # the optimizer checks its settings
    except TypeError as err:
        raise ValueError(str(err)) from err


def saved_config(out) -> dict | None:
    """The config of run directory ``out``: its checkpoint's, else its ``log.json``'s (a run
    that diverged before its first checkpoint, or whose checkpoint was deleted, has only the
    log); None if it has neither."""
    path = Path(out) / CHECKPOINT
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["config"]
    log = Path(out) / "log.json"
    return json.loads(log.read_text())["config"] if log.is_file() else None


def _resume_changes(saved: dict, cfg: TrainConfig, path) -> dict:
    """``{field: [saved, new]}`` of the settings a resume changes; ValueError naming those
    that would change the model, the data or the optimizer state."""
    # from_dict: fields added since the run was saved take their defaults (a new field's
    # default is the behaviour the runs before it had)
    saved, new = asdict(TrainConfig.from_dict(saved)), asdict(cfg)
    fixed = [k for k in RESUME_FIXED if saved.get(k) != new[k]]
    if fixed:
        diffs = ", ".join(f"{k} ({saved.get(k)!r} -> {new[k]!r})" for k in fixed)
        raise ValueError(f"cannot resume {path}: {diffs} would change the model, the data or "
                         "the optimizer; start a new run (another --out) instead")
    return {k: [saved.get(k), v] for k, v in new.items()
            if k != "out" and k not in RESUME_FIXED and saved.get(k) != v}


def build_optimizer(cfg: TrainConfig, model):
    # no weight decay on biases, norms, and the learned scalars (ρ, γ)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2)}
    if cfg.optimizer == "aiadam":
        return AttentionInformedAdam(groups, gamma=cfg.gamma, attention_norm=cfg.attention_norm,
                                     energy_source=model, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


@torch.no_grad()
def evaluate(model, data, starts, cfg, device, rank, world):
    """Mean validation loss over the fixed windows (split over ranks, all-reduced)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for i, lo in enumerate(range(0, starts.numel(), cfg.batch)):
        if i % world != rank:
            continue
        x, y = _windows(data, starts[lo:lo + cfg.batch], cfg.context, device)
        _, loss = model(x, y)
        total += torch.tensor([loss.item() * x.shape[0], x.shape[0]], dtype=torch.float64)
    if world > 1:  # on the model's device: an NCCL group has no CPU backend
        total = total.to(device)
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


@torch.no_grad()
def attention_maps(model, *inputs):
    """Attention maps ``[B, H, N, N]`` of every energy-recording module on ``model(*inputs)``."""
    recorders = energy_modules(model)
    was_training = model.training
    model.eval()
    for r in recorders:
        r.record_attention_maps = True
    try:
        model(*inputs)
        maps = [r.attention_maps.float().cpu() for r in recorders]
    finally:
        for r in recorders:
            r.record_attention_maps = False
            r.attention_maps = None
        model.train(was_training)
    return maps


def mean_kl(prev, cur) -> float:
    """Mean over modules, batch, heads and query rows of KL(prev ‖ cur)."""
    kls = [(torch.xlogy(p, p) - torch.xlogy(p, c.clamp_min(1e-30))).sum(-1).mean()
           for p, c in zip(prev, cur)]
    return torch.stack(kls).mean().item()


class Progress:
    """A one-line progress bar on a terminal; periodic lines otherwise (stderr)."""

    def __init__(self, total, enabled=True, interval=10, stream=None):
        self.total, self.enabled, self.interval = total, enabled, max(interval, 1)
        self.status = StatusLine(stream)

    def update(self, step, loss, tok_s, val=None, force=False):
        if not self.enabled:
            return
        val_s = f" | val {val:.4f}" if val is not None else ""
        line = (f"step {step:>{len(str(self.total))}}/{self.total} [{bar(step, self.total, 24)}]"
                f" loss {loss:.4f}{val_s} | {tok_s / 1e3:.1f}k tok/s")
        self.status.show(line, final=step == self.total,
                         due=force or step % self.interval == 0)


def _threads() -> str:
    n = torch.get_num_threads()
    return f"{n} thread" + ("s" if n != 1 else "")


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``: an interrupted write leaves the previous
    ``path`` whole (a reader never sees half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    write(tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- train
def train(cfg: TrainConfig, *, corpus=None, resume: bool = False, stop_at: int | None = None,
          progress: bool = True) -> dict:
    """Train (or resume) one run; returns the log ``{"config", "machine", "train", "eval",
    "summary"}`` and writes it (JSON, CSV, PNG) and the checkpoint under ``cfg.out``.

    Args:
        cfg: the run's :class:`TrainConfig`.
        corpus: a preloaded :class:`~energy_attn.training.corpus.Corpus` (default: load
            ``cfg.data``).
        resume: continue from ``cfg.out/ckpt.pt`` if it exists. The settings in
            :data:`RESUME_FIXED` must match the checkpoint's (ValueError naming those that
            differ); the others may change, e.g. a larger ``steps`` extends the run.
        stop_at: stop (with a checkpoint) after this many steps, as if interrupted; the
            schedule still runs to ``cfg.steps``. An int >= 1, and on a resume larger than
            the checkpoint's step.
        progress: show the progress bar (rank 0 only).

    Raises:
        TypeError: ``stop_at`` is not an int (or None).
        ValueError: a setting :func:`check_config` refuses, a corpus too small for
            ``context``, ``stop_at < 1``, or a resume that the checkpoint does not allow
            (a changed :data:`RESUME_FIXED` setting, ``steps`` or ``stop_at`` not past its
            step).
    """
    if stop_at is not None:
        if isinstance(stop_at, bool) or not isinstance(stop_at, numbers.Integral):
            raise TypeError(f"stop_at must be an int or None, got {stop_at!r}")
        if stop_at < 1:
            raise ValueError(f"stop_at must be >= 1 (steps to run before stopping), got {stop_at}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    check_config(cfg)
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    own_group = False
    if world > 1 and not dist.is_initialized():
        join_process_group("nccl" if device.type == "cuda" else "gloo")
        own_group = True
    try:
        log = _train(cfg, corpus, resume, stop_at, progress, world, rank, device)
    except BaseException:
        if own_group:  # no barrier here: the other ranks may be blocked in a collective
            dist.destroy_process_group()
        raise
    if own_group:
        leave_process_group()
    return log


def join_process_group(backend: str, **kwargs) -> None:
    """Create the default process group so that :func:`leave_process_group` can free it.

    ``torch.distributed.nn.functional`` binds ``group.WORLD`` as the default ``group`` argument
    of ten functions when it is first imported, and DistributedDataParallel's constructor
    imports it (through ``torch._dynamo``). Imported after the group exists, it keeps the
    default ProcessGroup referenced past ``destroy_process_group`` (PyTorch 2.13): the gloo
    backend stops its worker and I/O threads only in its destructor (``shutdown`` and
    ``abort`` leave them running), so they run on into interpreter teardown, which they can
    abort (``terminate called without an active exception``). Imported here first, those
    defaults are ``None`` (the default group at call time). ``backend`` and ``kwargs`` go to
    ``torch.distributed.init_process_group`` (env:// rendezvous unless ``init_method`` is
    given).
    """
    importlib.import_module("torch.distributed.nn.functional")
    dist.init_process_group(backend, **kwargs)


def leave_process_group() -> None:
    """Tear the default process group down once every rank is done with it: barrier, destroy.

    Ranks finish at different times (rank 0 still writes the log, its figure and the
    checkpoint); the barrier makes every rank leave together. Created by
    :func:`join_process_group` and used through DistributedDataParallel, nothing holds the
    group after ``destroy_process_group``, so its gloo threads are joined here, not at
    interpreter exit, once the DDP module that used it is gone (a cycle collection frees
    one held only by reference cycles). Call it on the success path only (a rank that raised
    may leave peers blocked in a collective, where a barrier would wait for the timeout).
    """
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
        gc.collect()


def _train(cfg, corpus, resume, stop_at, progress, world, rank, device):
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_steps(cfg, corpus, resume, stop_at, progress, world, rank, device)
    finally:
        torch.set_num_threads(threads)


def _run_steps(cfg, corpus, resume, stop_at, progress, world, rank, device):
    out = Path(cfg.out) if cfg.out else None
    is_main = rank == 0
    if corpus is None:
        corpus = load_corpus(cfg.data, val_fraction=cfg.val_fraction, min_bytes=cfg.context + 1)
    elif min(corpus.train.numel(), corpus.val.numel()) < cfg.context + 1:
        raise ValueError(f"the corpus is too small for context={cfg.context}")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    for r in energy_modules(model):
        r.record_mean_energy = True  # O(N·d) per forward: logged for every optimizer
    opt = build_optimizer(cfg, model)
    ddp = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                      else None)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp else None
    starts = val_starts(corpus.val, cfg)
    stab_x = None
    if cfg.stability_batch:
        stab_x, _ = _windows(corpus.val, starts[:cfg.stability_batch], cfg.context, device)

    log = {"config": asdict(cfg), "machine": machine_info(str(device)), "world_size": world,
           "corpus": corpus.describe(), "num_parameters": model.num_parameters(),
           "train": [], "eval": []}
    step, train_time, prev_maps, saved_step = 0, 0.0, None, None
    ckpt_path = out / CHECKPOINT if out else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        # on the CPU: load_state_dict moves the weights and the optimizer state to the
        # device, and the saved attention maps must stay beside the CPU ones they are compared
        # with (mean_kl)
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        changes = _resume_changes(ck["config"], cfg, ckpt_path)
        if ck.get("world_size", world) != world:  # the global batch changes with it
            changes["world_size"] = [ck["world_size"], world]
        if ck["step"] > cfg.steps:
            raise ValueError(f"cannot resume {ckpt_path} at step {ck['step']} with "
                             f"steps={cfg.steps}: give --steps >= {ck['step']}")
        if stop_at is not None and stop_at <= ck["step"]:
            # nothing would run, and the validation made at that stop would be dropped
            raise ValueError(f"cannot resume {ckpt_path} at step {ck['step']} with "
                             f"stop_at={stop_at}: give --stop-at > {ck['step']} (or none)")
        model.load_state_dict(ck["model"])
        settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        opt.load_state_dict(ck["optimizer"])  # its state, and its groups' settings ...
        for group, own in zip(opt.param_groups, settings):
            group.update(own)  # ... which give way to cfg's: a resume may change them
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        step, train_time, saved_step = ck["step"], ck["train_time"], ck["step"]
        # a validation made only because the run stopped there is not part of the run
        log["train"] = ck["log_train"]
        log["eval"] = [e for e in ck["log_eval"] if not e.get("at_stop")]
        log["resumes"] = [*ck.get("resumes", []), {"step": step, "changed": changes}]
        if is_main and progress:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
            print(f"resuming {ckpt_path} at step {step}" + (f"; changed: {what}" if what else ""),
                  file=sys.stderr)
        prev_maps = ck.get("prev_maps")
        torch.set_rng_state(ck["rng"])
        if device.type == "cuda" and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"], device)

    def run_eval(at_stop=False):
        nonlocal prev_maps
        rec = {"step": step, "time": train_time,
               "val_loss": evaluate(model, corpus.val, starts, cfg, device, rank, world)}
        if at_stop:  # extra, off the schedule: leaves the attention-stability chain alone
            rec["at_stop"] = True
        elif stab_x is not None:
            maps = attention_maps(model, stab_x)
            rec["attn_kl"] = mean_kl(prev_maps, maps) if prev_maps is not None else None
            prev_maps = maps
        log["eval"].append(rec)
        return rec["val_loss"]

    def save_checkpoint():
        nonlocal saved_step
        if not (is_main and ckpt_path):
            return
        saved_step = step
        out.mkdir(parents=True, exist_ok=True)
        state = {
            "config": asdict(cfg), "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "step": step,
            "train_time": train_time, "log_train": log["train"], "log_eval": log["eval"],
            "prev_maps": prev_maps, "rng": torch.get_rng_state(),
            "resumes": log.get("resumes", []), "world_size": world,
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }
        _atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))

    if progress and is_main:
        print(f"energy-attn train: GPT {cfg.block}/{cfg.attention} {cfg.n_layer}x{cfg.d_model}, "
              f"{model.num_parameters() / 1e6:.2f}M parameters | {cfg.optimizer} | {device}, "
              f"{_threads()}" + (f" x {world} processes" if world > 1 else "")
              + f" | steps {step} -> {cfg.steps if stop_at is None else min(cfg.steps, stop_at)}"
              f" of {cfg.steps}"
              + (f" | {out}" if out else " | nothing saved (no out)"), file=sys.stderr)
    bar = Progress(cfg.steps, enabled=progress and is_main, interval=cfg.log_interval)
    if step == 0 and not log["eval"]:
        run_eval()
    last = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    ckpt_every = cfg.ckpt_interval or cfg.eval_interval
    recorders = energy_modules(model)
    model.train()
    while step < last:
        t0 = time.perf_counter()
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = get_batch(corpus.train, cfg, step, rank, device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=cfg.amp):
            _, loss = ddp(x, y)
        if isinstance(opt, AttentionInformedAdam):
            opt.backward(loss, scaler)
        else:
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if cfg.grad_clip:
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        loss_t = loss.detach().float()
        if world > 1:
            dist.all_reduce(loss_t)
            loss_t /= world
        loss_v = loss_t.item()  # syncs the device, so the timing below is honest
        dt = time.perf_counter() - t0
        train_time += dt
        step += 1
        rec = {"step": step, "loss": loss_v, "lr": lr, "time": train_time, "step_time": dt}
        energies = [r.mean_energy for r in recorders if r.mean_energy is not None]
        if energies:
            rec["mean_energy"] = torch.stack(energies).mean().item()
        if isinstance(opt, AttentionInformedAdam) and opt.last_alpha:
            rec["alpha"] = opt.last_alpha[0].item()
        log["train"].append(rec)
        diverged = not math.isfinite(loss_v)  # every rank sees the same loss
        val = None
        if step % cfg.eval_interval == 0 or step == cfg.steps or diverged:
            val = run_eval()
        elif step == last:  # stopped early (stop_at): the final numbers are this step's
            val = run_eval(at_stop=True)
        # a diverged step is not checkpointed (its update made the weights non-finite): a
        # resume, e.g. with a lower lr, continues from the last checkpoint before it
        if not diverged and (step % ckpt_every == 0 or step == last):
            save_checkpoint()
        bar.update(step, loss_v, cfg.batch * cfg.context * world / dt, val, force=val is not None)
        if diverged:
            kept = f"; {ckpt_path} keeps step {saved_step}" if saved_step is not None else ""
            print(f"warning: the training loss is {loss_v} at step {step}; stopping{kept}",
                  file=sys.stderr)
            log["diverged_at"] = step
            break
    log["summary"] = summarize(log)
    if is_main and out is not None:
        for name, why in write_log(log, out).items():
            print(f"{name} skipped: {why}", file=sys.stderr)
    return log


def summarize(log: dict) -> dict:
    """Final/best validation loss, steps, time, ms/step (median), mean attention KL."""
    evals, trains = log["eval"], log["train"]
    kls = [e["attn_kl"] for e in evals if e.get("attn_kl") is not None]
    step_ms = sorted(1e3 * t["step_time"] for t in trains)
    return {
        "steps": trains[-1]["step"] if trains else 0,
        "diverged_at": log.get("diverged_at"),
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "best_val_loss": min(e["val_loss"] for e in evals) if evals else None,
        "train_time": trains[-1]["time"] if trains else 0.0,
        "median_step_ms": step_ms[len(step_ms) // 2] if step_ms else None,
        "mean_attn_kl": sum(kls) / len(kls) if kls else None,
    }


def write_log(log: dict, out: Path) -> dict:
    """``log.json``, ``log.csv`` (one row per step, validation columns at eval steps) and
    ``loss.png`` (if matplotlib is installed); returns ``{file: why}`` of the files skipped."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(log, indent=1)
    _atomic_write(out / "log.json", lambda tmp: tmp.write_text(text))  # compare reads it
    evals = {e["step"]: e for e in log["eval"]}
    cols = ["step", "loss", "lr", "time", "step_time", "mean_energy", "alpha", "val_loss",
            "attn_kl"]
    with open(out / "log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        if 0 in evals:
            w.writerow({"step": 0, **evals[0]})
        for t in log["train"]:
            w.writerow({**t, **{k: evals[t["step"]].get(k) for k in ("val_loss", "attn_kl")
                                if t["step"] in evals}})
    try:
        import matplotlib
    except ImportError:
        return {"loss.png": 'matplotlib is not installed (pip install "energy-attn[viz]")'}
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([t["step"] for t in log["train"]], [t["loss"] for t in log["train"]], lw=0.8,
            alpha=0.6, label="train")
    ax.plot([e["step"] for e in log["eval"]], [e["val_loss"] for e in log["eval"]], "o-",
            label="validation")
    c = log["config"]
    ax.set(xlabel="step", ylabel="loss (nats/byte)",
           title=f"GPT {c['block']}/{c['attention']}, {c['optimizer']}, seed {c['seed']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    return {}
