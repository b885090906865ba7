"""A small MobileNetV3-style CNN on synthetic 3x16x16 images: depthwise-separable blocks
with BatchNorm, in-place ReLU6 and Hardswish, squeeze-and-excitation (a Hardsigmoid
gate); SGD with momentum, MultiStepLR, gradient clipping by value, label smoothing; then
evaluation and a checkpoint.

Plain PyTorch. ``python mobilenet_multistep.py`` trains with torch; the same file runs on
gradmesh with only its import lines changed (docs/engine.md, "PyTorch scripts").
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

STEPS = 20
BATCH_SIZE = 16
NUM_CLASSES = 4


class SqueezeExcite(nn.Module):
    def __init__(self, channels, reduced):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Hardsigmoid(inplace=True)

    def forward(self, x):
        scale = self.gate(self.expand(F.relu(self.reduce(self.pool(x)))))
        return x * scale


class InvertedResidual(nn.Module):
    def __init__(self, in_channels, hidden, out_channels, stride, activation):
        super().__init__()
        self.residual = stride == 1 and in_channels == out_channels
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            activation(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            activation(inplace=True),
            SqueezeExcite(hidden, max(hidden // 4, 4)),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x):
        out = self.block(x)
        if self.residual:
            out += x
        return out


class MobileNet(nn.Module):
    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.Hardswish(inplace=True),
        )
        self.blocks = nn.Sequential(
            InvertedResidual(16, 32, 16, 1, nn.ReLU6),
            InvertedResidual(16, 48, 24, 2, nn.Hardswish),
            InvertedResidual(24, 64, 24, 1, nn.Hardswish),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(24, 64),
            nn.Hardswish(inplace=True),
            nn.Linear(64, num_classes),
        )

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def make_dataset(n=96, seed=1):
    # The class is the quadrant where a bright square sits, on noise.
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    images = 0.5 * torch.randn(n, 3, 16, 16, generator=g)
    for i, label in enumerate(labels.tolist()):
        row, col = 8 * (label // 2), 8 * (label % 2)
        images[i, :, row + 2 : row + 6, col + 2 : col + 6] += 2.0
    return TensorDataset(images, labels)


def build_model():
    torch.manual_seed(0)
    return MobileNet()


def train(model, dataset, steps=STEPS, on_step=None):
    loader = DataLoader(
        dataset,
        batch_size=BATCH_SIZE,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[10, 15], gamma=0.3)
    model.train()
    step = 0
    while step < steps:
        for images, labels in loader:
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            nn.utils.clip_grad_value_(model.parameters(), clip_value=1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            if on_step is not None:
                on_step(step, loss.item())
            if step == steps:
                break


def evaluate(model, dataset):
    model.eval()
    images, labels = dataset.tensors
    with torch.no_grad():
        logits = model(images)
        loss = F.cross_entropy(logits, labels).item()
        accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    return loss, accuracy


def main(checkpoint="mobilenet.pt"):
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
