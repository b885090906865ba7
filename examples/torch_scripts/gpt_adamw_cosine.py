"""A 2-layer GPT-style decoder (causal scaled_dot_product_attention, pre-LayerNorm, GELU
MLP, tied embeddings) on a synthetic next-token task: AdamW with weight decay on matrices
only, a cosine learning-rate schedule, gradient clipping; then greedy generation.

Plain PyTorch. ``python gpt_adamw_cosine.py`` trains with torch; the same file runs on
gradmesh with only its import lines changed (docs/engine.md, "PyTorch scripts").
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

STEPS = 20
BATCH_SIZE = 8
VOCAB = 32
CONTEXT = 16


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model, n_head):
        super().__init__()
        self.n_head = n_head
        # No bias: a key bias only adds a constant to each row of scores, which softmax
        # ignores, so its gradient is zero and Adam would step on rounding noise.
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, d_model, n_head):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab=VOCAB, context=CONTEXT, d_model=32, n_head=4, n_layer=2):
        super().__init__()
        self.context = context
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList([Block(d_model, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, new_tokens):
        for _ in range(new_tokens):
            logits, _ = self(idx[:, -self.context :])
            next_token = logits[:, -1, :].argmax(dim=-1, keepdim=True)
            idx = torch.cat((idx, next_token), dim=1)
        return idx


def make_dataset(n=64, seed=1):
    # Sequences counting up modulo VOCAB by a per-sequence stride: learnable in a few steps.
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    tokens = (start + stride * torch.arange(CONTEXT + 1)) % VOCAB
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


def build_model():
    torch.manual_seed(0)
    return GPT()


def configure_optimizer(model, lr, weight_decay):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def train(model, dataset, steps=STEPS, on_step=None):
    loader = DataLoader(
        dataset, batch_size=BATCH_SIZE, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    optimizer = configure_optimizer(model, lr=3e-3, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=3e-4)
    model.train()
    step = 0
    while step < steps:
        for x, y in loader:
            _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            if on_step is not None:
                on_step(step, loss.item())
            if step == steps:
                break


def evaluate(model, dataset):
    model.eval()
    x, y = dataset.tensors
    with torch.no_grad():
        _, loss = model(x, y)
    return loss.item(), math.exp(loss.item())


def main(checkpoint="gpt.pt"):
    dataset = make_dataset()
    model = build_model()
    train(model, dataset, on_step=lambda step, loss: print(f"step {step:2d}  loss {loss:.4f}"))
    loss, perplexity = evaluate(model, dataset)
    print(f"eval loss {loss:.4f}  perplexity {perplexity:.2f}")
    prompt = dataset.tensors[0][:2, :4]
    print("generated:", model.generate(prompt, 8).tolist())
    torch.save(model.state_dict(), checkpoint)
    restored = build_model()
    restored.load_state_dict(torch.load(checkpoint))
    return evaluate(restored, dataset)


if __name__ == "__main__":
    main()
