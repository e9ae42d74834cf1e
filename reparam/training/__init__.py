"""Fine-tuning: datasets, metrics, callbacks and a resumable, DDP-aware training loop.

Public API (signatures)::

    load_task(source, tokenizer, split="train", *, task=None, max_length=128, limit=None, limit_seed=None,
              text_column=None, label_column="label", label_names=None, hf_config=None, pad_to=None)
        -> TextClassificationData
        source: a GLUE task folder (".../glue/SST-2"; split "train" or "dev"; task = folder name unless `task`),
        a .csv/.tsv/.jsonl file (text column `text`, `sentence`, or `text_a`+`text_b` / `sentence1`+`sentence2`;
        label column `label`), or a Hugging Face `datasets` name ("hf:glue/sst2", or any name that is not a path
        here; split "dev" means "validation"); needs `datasets` installed, else DataError.
        limit=N keeps the first N rows; with limit_seed, a seeded random subset of N rows.
        pad_to=W pads every batch to width W (default: dynamic padding to the batch's longest row).
    load_text_blocks(path, tokenizer, block_size=128, *, limit=None, start=0.0, end=1.0) -> LMBlocks
        causal-LM data: a plain text file cut into fixed-length token blocks, labels = input_ids;
        start/end pick a character fraction of the file (0.0-0.9 train, 0.9-1.0 validation); limit = max blocks.

    Both datasets: len(), .kind ("classification" | "causal-lm"), .num_labels (1 = regression; None for LM),
    .metric_names, .task, .batches(batch_size, seed=0, epoch=0, shuffle=True) -> list of row-index lists
    (length-grouped, seeded), .collate(indices) -> dict of tensors (input_ids, attention_mask,
    [token_type_ids], labels). TextClassificationData also has .label_names (when labels were strings).

    TrainConfig(lr=5e-4, epochs=1.0, max_steps=None, batch_size=16, grad_accum=1, warmup_ratio=0.06,
                schedule="linear"|"cosine"|"constant", weight_decay=0.0, max_grad_norm=1.0, eval_every=None,
                eval_batch_size=64, log_path=None, log_every=10, checkpoint_dir=None, checkpoint_every=None,
                keep_checkpoints=2, resume=False, resume_from=None, seed=0, progress=True, regularizer_weight=0.0,
                delta_reg="none"|"l2"|"adamr"|"adamr_l1", delta_reg_strength=0.0)
        batch_size = examples per optimizer step over all ranks and micro-batches (the effective batch);
        grad_accum = micro-batches each rank splits its share into (saves memory, same result).
    train(model, train_data, config=None, eval_data=None, callbacks=()) -> TrainResult
        TrainResult: history (list of logged dicts: {"step", "epoch", "loss", "lr", "examples_per_s"} and
        {"step", "eval_<metric>"...}), eval_metrics (final evaluate() dict, {} without eval_data), wall_time (s),
        steps (optimizer steps done in total), examples_per_s, train_loss (mean step loss), resumed_from_step.
    AdamR(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4, l1=False): Adam with decoupled decay
        toward the parameters' initial values (DAREx), the optimizer of delta_reg="adamr"/"adamr_l1".
    evaluate(model, data, batch_size=64) -> dict   {"loss", <data.metric_names>...}; causal LM: {"loss", "perplexity"}

    Callback: on_train_begin(state), on_step_begin(state), after_backward(state), before_optimizer_step(state)
              (after clipping), after_optimizer_step(state) (gradients still there), on_step_end(state),
              on_evaluate(state, metrics), on_train_end(state), state_dict() -> dict, load_state_dict(dict)
    method_callbacks(model) -> the callbacks the active adapters' methods need (SORSA's regulariser step, rank
              allocators); train() adds them itself, a HF Trainer takes HFTrainerCallback(method_callbacks(model)).
    RankAllocator(model, adapter_name): base of the callbacks that resize an adapter's ranks while it trains
              (AdaLoRA's; see training/allocators.py); step(t, optimizer) for hand-written loops.
    TrainState: model, optimizer, scheduler, global_step, epoch, total_steps, loss, rank, world_size, config,
                history, should_stop, log(dict)
    HFTrainerCallback(callbacks): a transformers.TrainerCallback running reparam callbacks in a HF Trainer
                (imported lazily: transformers' Trainer stack loads only when it is first used).

    Metrics: accuracy, f1, matthews, pearson, spearman, compute_metrics(names, preds, labels) -> dict.
    compute_fisher(model, data, n_examples=None, *, mode="auto"|"exact"|"sampled"|"empirical"|"batch_approx",
                   samples=1, batch_size=2, seed=0) -> {param name: float32 diagonal Fisher};
    save_fisher(path, fisher, mode=, n_examples=, **metadata): the sidecar of Fisher merging (see training/fisher.py).
    Errors: DataError (a reparam.ReparamError) names the file, line and column; ConfigError for a bad TrainConfig.
"""
from .allocators import RankAllocator
from .callbacks import Callback, TrainState, method_callbacks
from .data import DataError, LMBlocks, TextClassificationData, load_task, load_text_blocks
from .delta_reg import AdamR
from .fisher import compute_fisher, save_fisher
from .loop import TrainConfig, TrainResult, evaluate, train
from .metrics import accuracy, compute_metrics, f1, matthews, pearson, spearman

__all__ = [
    "TrainConfig", "TrainResult", "train", "evaluate", "AdamR", "Callback", "TrainState", "HFTrainerCallback",
    "method_callbacks", "RankAllocator",
    "load_task", "load_text_blocks", "TextClassificationData", "LMBlocks", "DataError",
    "accuracy", "f1", "matthews", "pearson", "spearman", "compute_metrics",
    "compute_fisher", "save_fisher",
]


def __getattr__(name):
    if name == "HFTrainerCallback":  # imports transformers' Trainer stack: only on first use
        from . import callbacks

        return callbacks.HFTrainerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
