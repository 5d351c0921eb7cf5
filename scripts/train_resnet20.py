"""Train the bundled ResNet-20 on Fashion-MNIST and write src/hessq/models/resnet20_fashion_mnist.pt.

    python scripts/train_resnet20.py [--epochs 8] [--out PATH]

SGD lr 0.1 with a per-step cosine schedule, momentum 0.9, weight decay 5e-4,
batch 128, 2-pixel random crop and horizontal flip; seeded, CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from hessq.data import fashion_mnist
from hessq.models import resnet20


@torch.no_grad()
def evaluate(model: nn.Module, batches) -> float:
    model.eval()
    correct = total = 0
    for x, y in batches:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src/hessq/models/resnet20_fashion_mnist.pt")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train = fashion_mnist("train", batch_size=128, augment=True, seed=args.seed)
    test = fashion_mnist("test", batch_size=1000)
    model = resnet20(pretrained=False)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    total_steps = args.epochs * len(train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    loss_fn = nn.CrossEntropyLoss()
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        running = 0.0
        for x, y in train:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(y)
        acc = evaluate(model, test)
        print(f"epoch {epoch + 1}/{args.epochs} loss {running / 60000:.4f} test acc {acc:.4f} ({time.time() - start:.0f}s)", flush=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tmp = args.out.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} (test acc {acc:.4f})")


if __name__ == "__main__":
    main()
