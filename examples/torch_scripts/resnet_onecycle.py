"""A small ResNet (BasicBlocks with BatchNorm) on synthetic 3x12x12 images: SGD with
Nesterov momentum, OneCycleLR, gradient clipping; then evaluation and a checkpoint.

Plain PyTorch. ``python resnet_onecycle.py`` trains with torch; the same file runs on
gradmesh with only its import lines changed (docs/engine.md, "PyTorch scripts").
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

STEPS = 20
BATCH_SIZE = 16
NUM_CLASSES = 10


class BasicBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_classes=NUM_CLASSES, width=16):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def make_dataset(n=128, size=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return TensorDataset(images, labels)


def build_model():
    torch.manual_seed(0)
    return ResNet()


def train(model, dataset, steps=STEPS, on_step=None):
    loader = DataLoader(
        dataset, batch_size=BATCH_SIZE, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=steps)
    model.train()
    step = 0
    while step < steps:
        for images, labels in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=2.0)
            optimizer.step()
            scheduler.step()
            step += 1
            if on_step is not None:
                on_step(step, loss.item())
            if step == steps:
                break


def evaluate(model, dataset):
    model.eval()
    loader = DataLoader(dataset, batch_size=64)
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for images, labels in loader:
            logits = model(images)
            total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(dim=1) == labels).sum().item()
    return total_loss / len(dataset), correct / len(dataset)


def main(checkpoint="resnet.pt"):
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
