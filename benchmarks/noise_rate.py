"""Keyed noise generation rate: the ChaCha20 generator against the AES-128-CTR path it replaced.

    .venv/bin/python benchmarks/noise_rate.py [--rounds 7] [--log2-normals 24]

Prints normals per second (float32 output, one whole tensor) for:

- ``aes``: the AES-128-CTR keystream (OpenSSL) with torch's float64 log/sin/cos, as
  ``dpdist/privacy/noise.py`` drew noise up to commit 80b97c5 (kept here, minimal, as the reference);
- ``chacha20``: today's CPU path, ``keyed_normal`` (OpenSSL's ChaCha20 and the portable transform);
- ``torch-int``: the keystream that a GPU uses (torch integer ops) with the same transform, on the CPU;
- ``cuda``: ``keyed_normal(device="cuda")``, when a GPU is present,

at 1 and 2 CPU threads.  The generators alternate round by round so that a slow patch of a shared
machine hits all of them; the median and the fastest round are printed, and the ratio of the medians.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from dpdist.privacy import noise

SECRET, NAME = 0x5EC12E7, "bench.weight"


def aes_normal(secret: int, release: int, name: str, n: int) -> torch.Tensor:
    """The AES path for one whole tensor of even size: 2^20 normals per pass, Box-Muller in float64
    with torch's (libm/Sleef) log, sin and cos."""
    key = noise.derive_key(secret, release, "noise", name).to_bytes(32, "little")[:16]
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    out = torch.empty(n, dtype=torch.float32)
    batch = 1 << 20
    zeros = memoryview(np.zeros(8 * batch, np.uint8))
    words = np.empty(batch + 2, np.uint64)
    for pos in range(0, n, batch):
        count = min(batch, n - pos)
        encryptor.update_into(zeros[:8 * count], memoryview(words.view(np.uint8)))
        bits = (words[:count] >> np.uint64(11)).view(np.int64)
        u1 = torch.from_numpy(bits[0::2].astype(np.float64)).add_(1.0).mul_(2.0**-53)
        angle = torch.from_numpy(bits[1::2].astype(np.float64)).mul_(2 * math.pi * 2.0**-53)
        radius = u1.log_().mul_(-2.0).sqrt_()
        pairs = out[pos:pos + count].view(-1, 2)
        torch.mul(torch.sin(angle), radius, out=pairs[:, 1])
        torch.mul(angle.cos_(), radius, out=pairs[:, 0])
    return out


def torch_int_normal(secret: int, release: int, name: str, n: int) -> torch.Tensor:
    """The device path (torch ChaCha20 and the portable transform) run on the CPU."""
    keys = [noise.derive_key(secret, release, stream, name) for stream in ("noise", "noise-angle")]
    out = torch.empty(n, dtype=torch.float32)
    batch = 1 << 16
    for pos in range(0, n, batch):
        count = min(batch, n - pos)
        radius_words, angle_words = (noise.device_keystream_words(key, pos // 2, count // 2, "cpu") for key in keys)
        noise._box_muller(radius_words, angle_words, out[pos:pos + count])  # lowest u1 bucket: 2^-53 per pair
    return out


def cuda_normal(secret: int, release: int, name: str, n: int) -> torch.Tensor:
    out = noise.keyed_normal(secret, release, name, (n,), dtype=torch.float32, device="cuda")
    torch.cuda.synchronize()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--log2-normals", type=int, default=24)
    args = parser.parse_args()
    n = 1 << args.log2_normals
    generators = {"aes": aes_normal,
                  "chacha20": lambda *a: noise.keyed_normal(*a[:3], (a[3],), dtype=torch.float32),
                  "torch-int": torch_int_normal}
    if torch.cuda.is_available():
        generators["cuda"] = cuda_normal
    print(f"{n:,} normals (float32) per call, {args.rounds} rounds; torch {torch.__version__}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        times = {name: [] for name in generators}
        for name, generate in generators.items():
            generate(SECRET, 0, NAME, 1 << 16)  # warm up
        for release in range(args.rounds):
            for name, generate in generators.items():
                size = n if name != "torch-int" else n // 16  # the CPU run of the GPU's keystream is slow
                start = time.perf_counter()
                generate(SECRET, release, NAME, size)
                times[name].append(size / (time.perf_counter() - start))
        print(f"\n{threads} thread(s): M normals/s      median    best")
        for name, rates in times.items():
            print(f"  {name:12s}                {statistics.median(rates) / 1e6:8.1f}  {max(rates) / 1e6:6.1f}")
        for label, stat in (("median", statistics.median), ("best", max)):
            ratio = stat(times["aes"]) / stat(times["chacha20"])
            print(f"  chacha20 takes {ratio:.2f}x the time of aes ({label})")


if __name__ == "__main__":
    main()
