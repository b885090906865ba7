"""A model zoo written once in plain PyTorch, for the importer's tests: an MLP with dropout,
a ResNet-style CNN with BatchNorm (torchvision's in-place ReLUs and residual add), a
GPT-style decoder with tied weights and an LSTM classifier; seeded weights and batches."""

from __future__ import annotations

import torch
import torch.nn as tnn
import torch.nn.functional as TF

BATCH = 4
VOCAB, SEQ, WIDTH = 20, 6, 16

# ====================================================================== the zoo =========


class MLP(tnn.Module):
    def __init__(self):
        super().__init__()
        self.net = tnn.Sequential(
            tnn.Linear(8, 16), tnn.ReLU(), tnn.Dropout(0.5), tnn.Linear(16, 16), tnn.Tanh()
        )
        self.head = tnn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.net(x))


class Block(tnn.Module):
    """torchvision's BasicBlock: in-place ReLUs and ``out += identity``."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = tnn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = tnn.BatchNorm2d(c)
        self.relu = tnn.ReLU(inplace=True)
        self.conv2 = tnn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = tnn.BatchNorm2d(c)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(tnn.Module):
    def __init__(self):
        super().__init__()
        self.stem = tnn.Conv2d(3, 8, 3, padding=1)
        self.bn = tnn.BatchNorm2d(8)
        self.block = Block(8)
        self.pool = tnn.AdaptiveAvgPool2d(1)
        self.fc = tnn.Linear(8, 3)

    def forward(self, x):
        x = self.block(TF.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(self.pool(TF.max_pool2d(x, 2)), 1))


class CausalSelfAttention(tnn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = tnn.Linear(width, 3 * width)
        self.proj = tnn.Linear(width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
            for z in self.qkv(x).split(c, dim=2)
        )
        y = TF.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class GPT(tnn.Module):
    def __init__(self):
        super().__init__()
        self.tok = tnn.Embedding(VOCAB, WIDTH)
        self.pos = tnn.Embedding(SEQ, WIDTH)
        self.ln1 = tnn.LayerNorm(WIDTH)
        self.attn = CausalSelfAttention(WIDTH, 2)
        self.ln2 = tnn.LayerNorm(WIDTH)
        self.mlp = tnn.Sequential(
            tnn.Linear(WIDTH, 4 * WIDTH), tnn.GELU(), tnn.Linear(4 * WIDTH, WIDTH)
        )
        self.ln_f = tnn.LayerNorm(WIDTH)
        self.lm_head = tnn.Linear(WIDTH, VOCAB, bias=False)
        self.lm_head.weight = self.tok.weight  # tied: one parameter, two names

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return self.lm_head(self.ln_f(x))


class LSTMClassifier(tnn.Module):
    def __init__(self):
        super().__init__()
        self.emb = tnn.Embedding(30, 8)
        self.lstm = tnn.LSTM(8, 12, batch_first=True)
        self.fc = tnn.Linear(12, 3)

    def forward(self, x):
        out, _ = self.lstm(self.emb(x))
        return self.fc(out[:, -1])


def batch(name: str, n: int, seed: int = 0):
    """(input, target) of model ``name`` as torch tensors."""
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    if name == "resnet":
        return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    if name == "gpt":
        return (
            torch.randint(0, VOCAB, (n, SEQ), generator=g),
            torch.randint(0, VOCAB, (n, SEQ), generator=g),
        )
    return torch.randint(0, 30, (n, 5), generator=g), torch.randint(0, 3, (n,), generator=g)


ZOO = {"mlp": MLP, "resnet": ResNet, "gpt": GPT, "lstm": LSTMClassifier}


def torch_model(name: str) -> tnn.Module:
    torch.manual_seed(0)
    model = ZOO[name]()
    if name == "resnet":  # running statistics that are not the initial ones
        with torch.no_grad():
            for i, bn in enumerate(m for m in model.modules() if isinstance(m, tnn.BatchNorm2d)):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 1.5)
                bn.num_batches_tracked.fill_(3 + i)
    return model
