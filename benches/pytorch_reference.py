#!/usr/bin/env python3
"""The PyTorch side of `cargo run --release --example speed -- --pytorch`.

Times the same training steps as the example (forward, mean cross-entropy, backward, Adam
with the same hyper-parameters) of LeNet5-Caffe and LeNet-500-300 on the same MNIST batches,
with the same number of threads, and an eval-mode forward pass at the same batch size.
Prints one JSON object on stdout. Not a dependency of the crate: run it by hand or through
the example. Needs torch and numpy.
"""
import argparse
import gzip
import json
import os
import statistics
import time

import numpy as np
import torch
import torch.nn as nn


def lenet5_caffe():
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10),
    )


def lenet500_300():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 300), nn.ReLU(),
        nn.Linear(300, 10),
    )


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    rank = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(dims)


def find(data_dir, name):
    for path in (os.path.join(data_dir, name), os.path.join(data_dir, name + ".gz")):
        if os.path.exists(path):
            return path
    return None


def batches(args, count):
    """The example's batches: consecutive training images, pixels / 255 (random images
    where MNIST is missing, as the example does)."""
    n = args.batch_size
    images = find(args.data_dir, "train-images-idx3-ubyte")
    labels = find(args.data_dir, "train-labels-idx1-ubyte")
    if images and labels:
        x, y = read_idx(images), read_idx(labels)
        out = []
        for k in range(count):
            idx = [(k * n + i) % len(y) for i in range(n)]
            out.append((torch.from_numpy(x[idx].astype(np.float32) / 255.0).reshape(n, 1, 28, 28),
                        torch.from_numpy(y[idx].astype(np.int64))))
        return out
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
            for _ in range(count)]


def time_steps(args, model, data):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for k, (x, y) in enumerate(data[: args.warmup + args.steps]):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if k >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_inference(args, model, x):
    model.eval()
    times = []
    with torch.no_grad():
        for k in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            model(x)
            if k >= args.warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=os.path.join(os.environ.get("SBP_DATA_DIR", "data"), "mnist"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = batches(args, args.warmup + args.steps)
    out = {"version": torch.__version__, "threads": torch.get_num_threads()}
    for name, build in (("lenet5", lenet5_caffe), ("lenet500_300", lenet500_300)):
        step = time_steps(args, build(), data)
        infer = time_inference(args, build(), data[0][0])
        out[name] = {"step_ms": step, "infer_ms": infer}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
