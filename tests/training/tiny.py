"""Tiny BERT / GPT-2 models and small datasets for the training tests."""
import torch

import reparam
from reparam.training.data import TextClassificationData

WORDS = ["good", "bad", "great", "awful", "fine", "poor", "nice", "sad", "film", "plot", "the", "a"]


def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def tiny_bert(vocab_size, num_labels=2, seed=0, dropout=0.0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(cfg)


def lora_bert(vocab_size, num_labels=2, seed=0, dropout=0.0):
    model = tiny_bert(vocab_size, num_labels, seed, dropout)
    torch.manual_seed(seed + 1)
    reparam.adapt(model, reparam.LoraConfig(r=4, alpha=8, dropout=dropout), targets=["query", "value"],
                  modules_to_save=["classifier"])
    return model


def synthetic_data(n=48, seed=0, vocab=200, min_len=4, max_len=20, num_labels=2, pad_to=None):
    """Random token rows of varied length; the label is whether token 7 appears (learnable)."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        row = [101] + torch.randint(8, vocab, (length - 2,), generator=g).tolist() + [102]
        if torch.rand(1, generator=g).item() < 0.5:
            row[1] = 7
        ids.append(row)
        labels.append(int(7 in row) if num_labels > 1 else float(len(row)) / max_len)
    metrics = ["accuracy"] if num_labels > 1 else ["pearson", "spearman"]
    return TextClassificationData({"input_ids": ids}, labels, num_labels=num_labels, metric_names=metrics,
                                  pad_id=0, pad_to=pad_to)


def adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class TinyEncoder(torch.nn.Module):
    """A transformers-free classifier (embedding, two linear layers, masked mean-pool) for the DDP test: spawned
    workers then import only torch and reparam."""

    def __init__(self, vocab=300, d=16, num_labels=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.query = torch.nn.Linear(d, d)
        self.value = torch.nn.Linear(d, d)
        self.classifier = torch.nn.Linear(d, num_labels)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        h = torch.tanh(self.query(h)) * self.value(h)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.classifier((h * m).sum(1) / m.sum(1))


def lora_encoder(seed=0):
    torch.manual_seed(seed)
    model = TinyEncoder()
    for p in model.parameters():
        p.requires_grad_(False)
    reparam.adapt(model, reparam.LoraConfig(r=4, alpha=8), targets=["query", "value"], modules_to_save=["classifier"])
    return model
