"""Tiny models shared by the tests."""
import torch
from torch import nn


class TinyMLP(nn.Module):
    def __init__(self, d_in=16, hidden=24, d_out=8, dtype=torch.float32):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, dtype=dtype)
        self.fc2 = nn.Linear(hidden, hidden, dtype=dtype)
        self.classifier = nn.Linear(hidden, d_out, dtype=dtype)
        self.norm = nn.LayerNorm(hidden, dtype=dtype)

    def forward(self, x):
        return self.classifier(self.norm(torch.relu(self.fc2(torch.relu(self.fc1(x))))))


class MixedKinds(nn.Module):
    """One layer of every kind LoRA supports, including Hugging Face's Conv1D (fan-in/fan-out layout)."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(50, 12, padding_idx=0)
        self.proj = Conv1D(10, 12)  # d_out=10, d_in=12, weight stored 12 x 10
        self.conv1 = nn.Conv1d(10, 6, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, kernel_size=(3, 2), stride=1, padding=1)
        self.lin = nn.Linear(5, 4)

    def forward(self, ids):
        h = self.proj(self.emb(ids))  # (b, t, 10)
        h = self.conv1(h.transpose(1, 2))  # (b, 6, t)
        h = self.conv2(h.unsqueeze(-1))  # (b, 5, t', w)
        return self.lin(h.mean(dim=(2, 3)))


def randomize_adapters(model, std=0.1, seed=0):
    """Give every adapter parameter a random non-zero value (B = 0 at init hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
