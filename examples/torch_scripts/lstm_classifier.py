"""An LSTM sequence classifier (embedding, 2-layer LSTM, linear head on the last hidden
state) on synthetic token sequences: Adam, StepLR, gradient clipping; then evaluation.

Plain PyTorch. ``python lstm_classifier.py`` trains with torch; the same file runs on
gradmesh with only its import lines changed (docs/engine.md, "PyTorch scripts").
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

STEPS = 20
BATCH_SIZE = 16
VOCAB = 20
SEQ_LEN = 12
NUM_CLASSES = 3


class LSTMClassifier(nn.Module):
    def __init__(self, vocab=VOCAB, embed=16, hidden=32, num_layers=2, num_classes=NUM_CLASSES):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=num_layers, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, tokens):
        out, (h_n, c_n) = self.lstm(self.embedding(tokens))
        return self.fc(h_n[-1])


def make_dataset(n=96, seed=1):
    # The class is which third of the vocabulary the sequence's tokens mostly come from.
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    noise = torch.randint(0, VOCAB, (n, SEQ_LEN), generator=g)
    band = labels.unsqueeze(1) * (VOCAB // NUM_CLASSES) + torch.randint(
        0, VOCAB // NUM_CLASSES, (n, SEQ_LEN), generator=g
    )
    keep = torch.rand(n, SEQ_LEN, generator=g) < 0.7
    return TensorDataset(torch.where(keep, band, noise), labels)


def build_model():
    torch.manual_seed(0)
    return LSTMClassifier()


def train(model, dataset, steps=STEPS, on_step=None):
    loader = DataLoader(
        dataset, batch_size=BATCH_SIZE, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=8, gamma=0.5)
    model.train()
    step = 0
    while step < steps:
        for tokens, labels in loader:
            optimizer.zero_grad()
            loss = criterion(model(tokens), labels)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            if on_step is not None:
                on_step(step, loss.item())
            if step == steps:
                break


def evaluate(model, dataset):
    model.eval()
    tokens, labels = dataset.tensors
    with torch.no_grad():
        logits = model(tokens)
        loss = F.cross_entropy(logits, labels).item()
        accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    return loss, accuracy


def main(checkpoint="lstm.pt"):
    dataset = make_dataset()
    model = build_model()
    train(model, dataset, on_step=lambda step, loss: print(f"step {step:2d}  loss {loss:.4f}"))
    loss, accuracy = evaluate(model, dataset)
    print(f"eval loss {loss:.4f}  accuracy {accuracy:.3f}")
    torch.save(model.state_dict(), checkpoint)
    restored = build_model()
    restored.load_state_dict(torch.load(checkpoint))
    return evaluate(restored, dataset)


if __name__ == "__main__":
    main()
