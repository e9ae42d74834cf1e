"""Training callbacks: one interface used by reparam's own loop and, through HFTrainerCallback, by a HF Trainer."""
from __future__ import annotations

from typing import Any


class TrainState:
    """What callbacks see. model is the unwrapped model (never the DistributedDataParallel wrapper).

    global_step: optimizer steps done so far (on_step_begin of the first step sees 0; on_step_end of it sees 1).
    epoch: fractional epochs done; total_steps: optimizer steps the run will take; loss: the last step's loss
    (a float, or None before the first step); rank / world_size: the process in a distributed run.
    log(d): record metrics in the run's history (and its JSON-lines log, rank 0 only).
    should_stop: set True in a callback to end training after the current step.
    """

    def __init__(self, model=None, optimizer=None, scheduler=None, total_steps: int = 0, config=None,
                 rank: int = 0, world_size: int = 1, logger=None):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.global_step = 0
        self.epoch = 0.0
        self.total_steps = total_steps
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.loss: float | None = None
        self.history: list[dict[str, Any]] = []
        self.should_stop = False
        self._logger = logger

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, metrics: dict) -> None:
        entry = {"step": self.global_step, **metrics}
        self.history.append(entry)
        if self._logger is not None:
            self._logger(entry)


class Callback:
    """Subclass and override any hook; each is a no-op by default.

    Order within one optimizer step of reparam's loop:
      on_step_begin -> forward/backward of every micro-batch -> after_backward (gradients complete, averaged over
      ranks and micro-batches, unscaled; before clipping and optimizer.step) -> clip -> before_optimizer_step
      (gradients clipped; what a method adds here is not clipped, e.g. SORSA's regulariser) -> optimizer.step ->
      after_optimizer_step (parameters updated, gradients still present, global_step still this step's index: e.g.
      AdaLoRA's rank allocation) -> scheduler.step -> on_step_end (gradients still present; zeroed right after) ->
      logging/eval/checkpoint.
    state_dict()/load_state_dict(): whatever a callback returns here is saved in training checkpoints (torch.save
    format; tensors, numbers, strings, lists and dicts) and handed back on resume.
    """

    def on_train_begin(self, state: TrainState) -> None:
        pass

    def on_step_begin(self, state: TrainState) -> None:
        pass

    def after_backward(self, state: TrainState) -> None:
        pass

    def before_optimizer_step(self, state: TrainState) -> None:
        pass

    def after_optimizer_step(self, state: TrainState) -> None:
        pass

    def on_step_end(self, state: TrainState) -> None:
        pass

    def on_evaluate(self, state: TrainState, metrics: dict) -> None:
        pass

    def on_train_end(self, state: TrainState) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def learning_rates(optimizer) -> dict[int, float]:
    """{id(parameter): its group's current learning rate}; empty without an optimizer. For callbacks that update
    some parameters themselves (SaRA's and SpIEL's decoupled weight decay, SpIEL-MA's SM3 step)."""
    return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]} if optimizer is not None else {}


def call(callbacks, hook: str, state: TrainState, *args) -> None:
    for cb in callbacks:
        getattr(cb, hook)(state, *args)


def method_callbacks(model, given=(), optimizer=None) -> list:
    """The callbacks the methods of `model`'s active adapters need in training (Adapter.training_callbacks, e.g.
    SORSA's regulariser step), one of each type, leaving out types already in `given`; plus a rank allocator
    (Adapter.rank_allocator(model, name, optimizer), e.g. AdaLoRA's) for each adapter `given` has none for. reparam's
    loop adds them itself; with a Hugging Face Trainer pass HFTrainerCallback(method_callbacks(model))."""
    from ..core.model import active_adapters, get_record
    from ..core.registry import get_method

    out = list(given)
    for name in active_adapters(model):
        adapter_cls = get_method(get_record(model, name).config.method).adapter_cls
        for cb in adapter_cls.training_callbacks():
            if not any(type(c) is type(cb) for c in out):
                out.append(cb)
        allocator = getattr(adapter_cls, "rank_allocator", None)  # bound to the model: it resizes it on resume
        if allocator is not None and not any(getattr(c, "model", None) is model and
                                             getattr(c, "adapter_name", None) == name for c in out):
            out.append(allocator(model, name, optimizer))
    return out[len(given):]


_HF_CLASS = None


def __getattr__(name):
    # HFTrainerCallback subclasses transformers.TrainerCallback, whose import pulls in the Trainer stack (seconds):
    # build the class on first use only.
    if name == "HFTrainerCallback":
        return _hf_trainer_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _hf_trainer_callback_class():
    global _HF_CLASS
    if _HF_CLASS is not None:
        return _HF_CLASS
    from transformers import TrainerCallback

    class HFTrainerCallback(TrainerCallback):
        """Run reparam callbacks inside a Hugging Face `transformers.Trainer`:

            trainer = Trainer(..., callbacks=[HFTrainerCallback([my_callback])])

        Hook mapping: on_train_begin -> on_train_begin, on_step_begin -> on_step_begin, on_pre_optimizer_step ->
        after_backward then before_optimizer_step, on_optimizer_step -> after_optimizer_step, on_step_end ->
        on_step_end, on_evaluate -> on_evaluate, on_train_end -> on_train_end.
        Differences from reparam's loop: the Trainer clips gradients *before* on_pre_optimizer_step, and has already
        zeroed them at on_step_end. state.log() entries go to `self.history` (and to the Trainer's log history).
        Callback state_dicts are not part of Trainer checkpoints.
        """

        def __init__(self, callbacks):
            self.callbacks = list(callbacks)
            self.state = TrainState()
            self.history = self.state.history

        def _sync(self, args, hf_state, kwargs) -> TrainState:
            s = self.state
            if kwargs.get("model") is not None:
                s.model = kwargs["model"]
            if kwargs.get("optimizer") is not None:
                s.optimizer = kwargs["optimizer"]
            if kwargs.get("lr_scheduler") is not None:
                s.scheduler = kwargs["lr_scheduler"]
            s.global_step = hf_state.global_step
            s.epoch = float(hf_state.epoch or 0.0)
            s.total_steps = hf_state.max_steps
            s.config = args
            s.rank = getattr(args, "process_index", 0)
            s.world_size = getattr(args, "world_size", 1)
            s._logger = (lambda entry: hf_state.log_history.append(dict(entry)))
            return s

        def _run(self, hook, args, hf_state, control, kwargs, *extra):
            s = self._sync(args, hf_state, kwargs)
            call(self.callbacks, hook, s, *extra)
            if s.should_stop:
                control.should_training_stop = True
            return control

        def on_train_begin(self, args, state, control, **kwargs):
            return self._run("on_train_begin", args, state, control, kwargs)

        def on_step_begin(self, args, state, control, **kwargs):
            return self._run("on_step_begin", args, state, control, kwargs)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self._run("after_backward", args, state, control, kwargs)
            return self._run("before_optimizer_step", args, state, control, kwargs)

        def on_optimizer_step(self, args, state, control, **kwargs):
            return self._run("after_optimizer_step", args, state, control, kwargs)

        def on_step_end(self, args, state, control, **kwargs):
            return self._run("on_step_end", args, state, control, kwargs)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            return self._run("on_evaluate", args, state, control, kwargs, dict(metrics or {}))

        def on_train_end(self, args, state, control, **kwargs):
            return self._run("on_train_end", args, state, control, kwargs)

    HFTrainerCallback.__module__ = __name__
    HFTrainerCallback.__qualname__ = "HFTrainerCallback"
    _HF_CLASS = HFTrainerCallback
    return _HF_CLASS
