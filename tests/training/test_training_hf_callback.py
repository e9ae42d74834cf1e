import torch

from reparam.training import Callback, HFTrainerCallback
from tests.training.tiny import lora_bert, synthetic_data


class Rec(Callback):
    def __init__(self):
        self.events = []
        self.grads_present = []
        self.count = 0

    def on_train_begin(self, state):
        self.events.append(("begin", state.total_steps))

    def on_step_begin(self, state):
        self.events.append(("step_begin", state.global_step))

    def after_backward(self, state):
        lora = [p for n, p in state.model.named_parameters() if "lora_" in n]
        self.grads_present.append(bool(lora) and all(p.grad is not None for p in lora))
        self.events.append(("after_backward", state.global_step))
        assert state.optimizer is not None and state.scheduler is not None

    def on_step_end(self, state):
        self.events.append(("step_end", state.global_step))
        state.log({"custom": state.global_step})

    def on_evaluate(self, state, metrics):
        self.events.append(("evaluate", "eval_loss" in metrics))

    def on_train_end(self, state):
        self.events.append(("end", state.global_step))


def test_reparam_callbacks_inside_hf_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = lora_bert(300)
    data = synthetic_data(24)
    rows = [{"row": i} for i in range(len(data))]  # the Trainer batches row ids; reparam's data pads them

    def collate(features):
        return data.collate([f["row"] for f in features])

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8,
                             per_device_eval_batch_size=8, learning_rate=1e-3, use_cpu=True, report_to=[],
                             save_strategy="no", logging_strategy="no", eval_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0,
                             remove_unused_columns=False)
    rec = Rec()
    bridge = HFTrainerCallback([rec])
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:8], data_collator=collate,
                      callbacks=[bridge])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer.train()
    trainer.evaluate()
    assert rec.events == [("begin", 3), ("step_begin", 0), ("after_backward", 0), ("step_end", 1),
                          ("step_begin", 1), ("after_backward", 1), ("step_end", 2),
                          ("step_begin", 2), ("after_backward", 2), ("step_end", 3), ("end", 3),
                          ("evaluate", True)]
    assert rec.grads_present == [True, True, True]
    assert [h["custom"] for h in bridge.history] == [1, 2, 3]
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
