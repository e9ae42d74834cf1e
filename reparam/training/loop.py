"""The training loop: AdamW on the trainable parameters, LR schedules, gradient accumulation, JSON-lines logs,
atomic resumable checkpoints (bit-exact resume on CPU) and DistributedDataParallel when torch.distributed is up.

Batch semantics: `batch_size` is the number of examples per optimizer step over all ranks and accumulation
micro-batches (the effective batch). Each step's global batch comes from the dataset's seeded, length-grouped
plan; rank r takes the r-th contiguous slice of it and cuts that into `grad_accum` micro-batches.
Every micro-batch loss (a mean over its examples) is weighted by (its examples x world size / global batch), so
after DDP averages gradients over ranks the gradient is exactly that of the mean loss over the global batch,
however the batch is split: a run on N processes matches a single-process run with the same `batch_size`.
"""
from __future__ import annotations

import inspect
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError, ReparamError
from ..core.model import regularizer
from ..io.files import atomic_write, read_json, read_safetensors, write_json, write_safetensors
from .callbacks import TrainState, call, method_callbacks
from .delta_reg import DELTA_REGS, AdamR, DeltaL2
from .metrics import compute_metrics

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class TrainConfig:
    """Options of `train`.

    lr: peak learning rate (AdamW). epochs: passes over the data (may be fractional); max_steps, when set,
    overrides epochs. batch_size: examples per optimizer step, over all ranks and micro-batches. grad_accum:
    micro-batches each rank splits its share into (memory only; the result is the same). warmup_ratio: fraction of
    the steps with a linear warm-up. schedule: "linear" | "cosine" | "constant" (after warm-up). weight_decay:
    AdamW decay on matrices (not biases / norm weights). max_grad_norm: clip (0 or None = off). eval_every: evaluate
    eval_data every N steps (and always at the end). log_path: JSON-lines file of logged metrics. log_every: log the
    training loss every N steps. checkpoint_dir / checkpoint_every: write a resumable checkpoint every N steps (and
    at the end). resume: continue from the latest checkpoint in checkpoint_dir (fresh start when there is none);
    resume_from: a checkpoint folder (or a checkpoint_dir) to continue from. keep_checkpoints: how many to keep.
    seed: seeds torch, random, numpy and the data order. progress: tqdm bar. regularizer_weight: weight of
    reparam.regularizer(model) added to the task loss. delta_reg: keep theta - theta_0 (the trainable values at the
    start) small for DARE/DAREx afterwards: "none", "l2" (strength/2 * ||theta - theta_0||^2 added to the loss),
    "adamr" / "adamr_l1" (AdamR instead of AdamW: decoupled decay toward theta_0, see reparam.training.delta_reg);
    delta_reg_strength: that strength / AdamR's weight decay.
    """

    lr: float = 5e-4
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    warmup_ratio: float = 0.06
    schedule: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None
    eval_batch_size: int = 64
    log_path: str | None = None
    log_every: int = 10
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    resume: bool = False
    resume_from: str | None = None
    seed: int = 0
    progress: bool = True
    regularizer_weight: float = 0.0
    delta_reg: str = "none"
    delta_reg_strength: float = 0.0

    def __post_init__(self):
        def need(ok, name, why):
            if not ok:
                raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1 (or None)")
        need(self.max_steps is not None or self.epochs > 0, "epochs", "must be > 0")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.eval_every is None or self.eval_every >= 1, "eval_every", "must be >= 1 (or None)")
        need(self.checkpoint_every is None or self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        need(self.log_every >= 1, "log_every", "must be >= 1")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        need(self.delta_reg in DELTA_REGS, "delta_reg", f"must be one of {', '.join(DELTA_REGS)}")
        need(self.delta_reg_strength >= 0, "delta_reg_strength", "must be >= 0")
        need(not (self.delta_reg.startswith("adamr") and self.weight_decay), "weight_decay",
             f"AdamR (delta_reg={self.delta_reg!r}) decays toward theta_0, not 0; use delta_reg_strength instead")
        need(self.checkpoint_every is None or self.checkpoint_dir, "checkpoint_every", "needs checkpoint_dir")


@dataclass
class TrainResult:
    history: list = field(default_factory=list)
    eval_metrics: dict = field(default_factory=dict)
    wall_time: float = 0.0
    steps: int = 0
    examples_per_s: float = 0.0
    train_loss: float | None = None
    resumed_from_step: int = 0


# ---------------------------------------------------------------------------------------------------- helpers

def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _accepted_inputs(model) -> set[str] | None:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def _model_inputs(model, batch, device):
    accepted = _accepted_inputs(model)
    return {k: v.to(device) for k, v in batch.items()
            if k != "labels" and (accepted is None or k in accepted)}


def _logits(outputs):
    if isinstance(outputs, torch.Tensor):
        return outputs
    if hasattr(outputs, "logits"):
        return outputs.logits
    return outputs[0]


def _task_loss(logits, labels, kind: str, num_labels):
    """Mean loss over the examples of the batch (causal LM: over its predicted tokens)."""
    if kind == "causal-lm":
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
    if num_labels == 1:
        return F.mse_loss(logits.reshape(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def _device_of(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _schedule_fn(config: TrainConfig, total_steps: int):
    warmup = int(round(config.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if config.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def _split(seq, parts: int):
    """`seq` cut into `parts` contiguous slices whose sizes differ by at most one (earlier slices larger)."""
    n = len(seq)
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(seq[start:start + size])
        start += size
    return out


def _clipped(params: dict, optimizer) -> list:
    """The parameters trained from the start, then those a growing rank allocator (IncreLoRA) added since."""
    known = {id(p) for p in params.values()}
    return list(params.values()) + [p for g in optimizer.param_groups for p in g["params"] if id(p) not in known]


def _trainable(model) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, data, batch_size: int = 64) -> dict:
    """Loss and the dataset's metrics (data.metric_names) over all of `data`, in file order, without dropout.

    Classification: "loss" (mean cross-entropy) plus e.g. "accuracy"; regression: "loss" (MSE) plus
    "pearson"/"spearman"; causal LM: "loss" (mean token cross-entropy) and "perplexity".
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    was_training = model.training
    model.eval()
    device = _device_of(model)
    kind = getattr(data, "kind", "classification")
    total_loss, total_n = 0.0, 0
    preds, labels = [], []
    try:
        for idx in data.batches(batch_size, shuffle=False):
            batch = data.collate(idx)
            logits = _logits(model(**_model_inputs(model, batch, device)))
            y = batch["labels"].to(device)
            if kind == "causal-lm":
                n = int((y[:, 1:] != -100).sum())
            else:
                n = len(idx)
                if data.num_labels == 1:
                    preds.append(logits.reshape(-1).float().cpu())
                else:
                    preds.append(logits.argmax(-1).cpu())
                labels.append(batch["labels"])
            total_loss += float(_task_loss(logits, y, kind, getattr(data, "num_labels", None))) * n
            total_n += n
    finally:
        model.train(was_training)
    out = {"loss": total_loss / max(total_n, 1)}
    if kind == "causal-lm":
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    elif preds:
        out.update(compute_metrics(data.metric_names, torch.cat(preds).numpy(), torch.cat(labels).numpy()))
    return out


# ------------------------------------------------------------------------------------------------ checkpoints

def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
    }


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))


_ORDER_KEYS = ("seed", "batch_size")


def _save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, scheduler, callbacks, config: TrainConfig,
                     history, loss_sum: float, loss_count: int) -> Path:
    folder = ckpt_dir / f"checkpoint-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "trainable.safetensors", _trainable(model), metadata={"step": str(step)})
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "callbacks": [cb.state_dict() for cb in callbacks],
        "config": {k: getattr(config, k) for k in _ORDER_KEYS},
        "history": json.dumps(history, default=_json_default),
        "loss_sum": loss_sum,
        "loss_count": loss_count,
    }
    atomic_write(folder / "state.pt", lambda tmp: torch.save(state, tmp))
    write_json(ckpt_dir / "latest.json", {"step": step, "checkpoint": folder.name})
    old = sorted(p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and p != folder)
    for p in old[:max(0, len(old) - (config.keep_checkpoints - 1))]:
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    return folder


def _find_checkpoint(path: Path) -> Path | None:
    """A checkpoint folder from `path`: the folder itself, or the one latest.json in it names."""
    if (path / "state.pt").is_file():
        return path
    latest = path / "latest.json"
    if latest.is_file():
        folder = path / read_json(latest)["checkpoint"]
        if not (folder / "state.pt").is_file():
            raise ReparamError(f"{latest}: names checkpoint {folder.name!r}, which is missing or incomplete")
        return folder
    return None


def _load_checkpoint(folder: Path, model, optimizer, scheduler, callbacks, config: TrainConfig) -> dict:
    try:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ReparamError(f"{folder / 'state.pt'}: cannot read training state ({type(e).__name__}: {e})") from None
    for k in _ORDER_KEYS:
        if state["config"].get(k) != getattr(config, k):
            raise ReparamError(f"{folder}: checkpoint was written with {k}={state['config'].get(k)!r}, this run has "
                               f"{k}={getattr(config, k)!r}; resume needs the same {', '.join(_ORDER_KEYS)}")
    if len(state["callbacks"]) != len(callbacks):
        raise ReparamError(f"{folder}: checkpoint holds state of {len(state['callbacks'])} callbacks, "
                           f"this run has {len(callbacks)}")
    # Callbacks first: a rank allocator gives the adapter the shapes it had at the checkpoint (pruned or grown).
    for cb, s in zip(callbacks, state["callbacks"]):
        cb.load_state_dict(s)
    tensors, _ = read_safetensors(folder / "trainable.safetensors")
    params = _trainable(model)
    if set(tensors) != set(params):
        missing = sorted(set(params) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(params))[:3]
        raise ReparamError(f"{folder}: checkpoint does not fit the model's trainable parameters "
                           f"(missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise ReparamError(f"{folder}: {name} has shape {tuple(tensors[name].shape)}, "
                                   f"model has {tuple(p.shape)}")
            p.copy_(tensors[name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state


# ------------------------------------------------------------------------------------------------------ train

def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def train(model: nn.Module, train_data, config: TrainConfig | None = None, eval_data=None,
          callbacks=()) -> TrainResult:
    """Train the parameters of `model` that require grad on `train_data`; returns a TrainResult.

    The model is called with the batch's input_ids / attention_mask / token_type_ids (the ones its forward
    accepts); the loss is computed here from the logits: cross-entropy (classification), MSE (num_labels == 1),
    next-token cross-entropy (causal LM), plus config.regularizer_weight * reparam.regularizer(model).
    Under an initialised torch.distributed process group the model is wrapped in DistributedDataParallel; only
    rank 0 logs, shows progress and writes checkpoints; every rank evaluates the whole eval set (same numbers).
    Training runs in float32 on the model's device (no mixed precision).
    """
    config = config or TrainConfig()
    callbacks = list(callbacks)
    rank, world = _dist()
    raw_model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    params = _trainable(raw_model)
    if not params:
        raise ReparamError("the model has no trainable parameters (requires_grad=False everywhere); "
                           "adapt it with reparam.adapt first")
    if len(train_data) == 0:
        raise ReparamError("the training data is empty")
    kind = getattr(train_data, "kind", "classification")
    num_labels = getattr(train_data, "num_labels", None)
    device = _device_of(raw_model)

    _seed_all(config.seed)
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if config.delta_reg.startswith("adamr"):  # every trainable tensor decays toward its start, biases included
        optimizer = AdamR(list(params.values()), lr=config.lr, weight_decay=config.delta_reg_strength,
                          l1=config.delta_reg == "adamr_l1")
    else:
        optimizer = torch.optim.AdamW(groups, lr=config.lr)
    if config.delta_reg == "l2":  # first, so the user's after_backward hooks see the full gradient
        callbacks.insert(0, DeltaL2(params, config.delta_reg_strength))
    callbacks += method_callbacks(raw_model, callbacks, optimizer)  # e.g. SORSA's regulariser step, rank allocators
    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule_fn(config, total_steps))

    if world > 1 and not isinstance(model, nn.parallel.DistributedDataParallel):
        ddp_kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
        model = nn.parallel.DistributedDataParallel(raw_model, **ddp_kw)
    fwd_model = model

    log_file = None

    def write_log(entry):
        if log_file is not None:
            log_file.write(json.dumps(entry, default=_json_default) + "\n")
            log_file.flush()

    state = TrainState(raw_model, optimizer, scheduler, total_steps, config, rank, world, write_log)
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    start_step, loss_sum, loss_count = 0, 0.0, 0
    resume_path = Path(config.resume_from) if config.resume_from else (ckpt_dir if config.resume else None)
    if resume_path is not None:
        folder = _find_checkpoint(resume_path)
        if folder is None and config.resume_from:
            raise ReparamError(f"{resume_path}: no checkpoint here (expected state.pt or latest.json)")
        if folder is not None:
            saved = _load_checkpoint(folder, raw_model, optimizer, scheduler, callbacks, config)
            start_step = saved["step"]
            state.history.extend(json.loads(saved["history"]))
            loss_sum, loss_count = saved["loss_sum"], saved["loss_count"]
    state.global_step = start_step
    if config.log_path and rank == 0:
        log = Path(config.log_path)
        log.parent.mkdir(parents=True, exist_ok=True)
        if resume_path is not None and log.is_file():
            _truncate_log(log, start_step)
        log_file = open(log, "a", encoding="utf-8")
    state.epoch = start_step / steps_per_epoch

    bar = None
    if config.progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    t0 = time.perf_counter()
    examples = 0
    window_loss, window_n = 0.0, 0
    last_saved = start_step if resume_path is not None and start_step else -1
    eval_metrics: dict = {}
    plans: dict[int, list] = {}
    raw_model.train()
    call(callbacks, "on_train_begin", state)
    try:
        step = start_step
        while step < total_steps and not state.should_stop:
            epoch, b = divmod(step, steps_per_epoch)
            if epoch not in plans:
                plans.clear()
                plans[epoch] = train_data.batches(config.batch_size, seed=config.seed, epoch=epoch)
            global_idx = plans[epoch][b]
            mine = _split(global_idx, world)[rank]
            weight_rows = True
            if not mine:  # fewer rows than ranks: take part in the gradient all-reduce with a zero-weight row
                mine, weight_rows = global_idx[:1], False
            micro = [m for m in _split(mine, config.grad_accum) if m]
            call(callbacks, "on_step_begin", state)
            step_loss = torch.zeros((), dtype=torch.float64, device=device)  # on device: NCCL all_reduce
            for i, idx in enumerate(micro):
                batch = train_data.collate(idx)
                w = (len(idx) * world / len(global_idx)) if weight_rows else 0.0
                sync = i == len(micro) - 1
                ctx = fwd_model.no_sync() if (world > 1 and not sync) else _null()
                with ctx:
                    logits = _logits(fwd_model(**_model_inputs(raw_model, batch, device)))
                    loss = _task_loss(logits, batch["labels"].to(device), kind, num_labels)
                    if config.regularizer_weight:
                        loss = loss + config.regularizer_weight * regularizer(raw_model).to(loss.device)
                    (loss * w).backward()
                step_loss += loss.detach().double() * (w / world)
            call(callbacks, "after_backward", state)
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(_clipped(params, optimizer), config.max_grad_norm)
            call(callbacks, "before_optimizer_step", state)
            optimizer.step()
            call(callbacks, "after_optimizer_step", state)
            scheduler.step()
            step += 1
            examples += len(global_idx)
            state.global_step = step
            state.epoch = step / steps_per_epoch
            if world > 1:
                torch.distributed.all_reduce(step_loss)
            state.loss = float(step_loss)
            loss_sum += state.loss
            loss_count += 1
            window_loss += state.loss
            window_n += 1
            call(callbacks, "on_step_end", state)
            optimizer.zero_grad(set_to_none=True)

            if bar is not None:
                rate = examples / max(time.perf_counter() - t0, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{state.loss:.4f}", ex_s=f"{rate:.1f}")
            if step % config.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                if rank == 0:
                    state.log({"epoch": round(state.epoch, 4), "loss": window_loss / max(window_n, 1),
                               "lr": scheduler.get_last_lr()[0],
                               "examples_per_s": examples / max(now - t0, 1e-9)})
                window_loss, window_n = 0.0, 0
            if eval_data is not None and config.eval_every and step % config.eval_every == 0 and step < total_steps:
                eval_metrics = _run_eval(raw_model, eval_data, config, state, callbacks)
            if ckpt_dir is not None and config.checkpoint_every and step % config.checkpoint_every == 0:
                _checkpoint(ckpt_dir, step, raw_model, optimizer, scheduler, callbacks, config, state, loss_sum,
                            loss_count, rank, world)
                last_saved = step
        if eval_data is not None:
            eval_metrics = _run_eval(raw_model, eval_data, config, state, callbacks)
        if ckpt_dir is not None and last_saved != step:
            _checkpoint(ckpt_dir, step, raw_model, optimizer, scheduler, callbacks, config, state, loss_sum,
                        loss_count, rank, world)
        call(callbacks, "on_train_end", state)
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
    wall = time.perf_counter() - t0
    return TrainResult(history=list(state.history), eval_metrics=eval_metrics, wall_time=wall,
                       steps=state.global_step, examples_per_s=examples / max(wall, 1e-9),
                       train_loss=loss_sum / loss_count if loss_count else None, resumed_from_step=start_step)


def _json_default(x):
    """Tensors and numpy values a callback logged, as JSON numbers or lists."""
    if isinstance(x, (torch.Tensor, np.ndarray, np.generic)):
        return x.item() if getattr(x, "ndim", 0) == 0 else x.tolist()
    return str(x)


def _truncate_log(path: Path, step: int) -> None:
    """Drop the log lines of steps after `step` (written by a run that died after its last checkpoint)."""
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the crash
        if isinstance(entry, dict) and entry.get("step", 0) <= step:
            keep.append(line)
    text = "".join(x + "\n" for x in keep)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _run_eval(model, data, config, state, callbacks) -> dict:
    metrics = evaluate(model, data, config.eval_batch_size)
    if state.rank == 0:
        state.log({f"eval_{k}": v for k, v in metrics.items()})
    call(callbacks, "on_evaluate", state, metrics)
    return metrics


def _checkpoint(ckpt_dir, step, model, optimizer, scheduler, callbacks, config, state, loss_sum, loss_count,
                rank, world) -> None:
    if rank == 0:
        _save_checkpoint(ckpt_dir, step, model, optimizer, scheduler, callbacks, config, state.history,
                         loss_sum, loss_count)
    if world > 1:
        torch.distributed.barrier()
