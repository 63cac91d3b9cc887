"""LoRA memory per adapter, per tier, for a base model's shape: the arithmetic behind the
adapter tiers of ``serving/gpu.yaml`` (docs/cluster.md, "Many adapters on one GPU"), and
the same figures measured on a CUDA GPU when one is present.

Per rank, a LoRA adds ``r x (in + out)`` parameters to every target module of every
layer. vLLM keeps three copies, each bounded by a serving-config key:

- **GPU slots** (``max_adapters_per_batch`` = vLLM ``max_loras``): preallocated at
  ``max_lora_rank`` (every adapter is padded to it) in the engine's dtype;
- **host memory** (``max_adapters_per_replica`` = ``max_cpu_loras``): each adapter at
  its own rank, in the engine's dtype;
- **node disk** (``adapter_cache.disk_gib``): each version's safetensors as trained
  (float32 from the fine-tuning jobs).

With ``--measure`` on a CUDA machine, the GPU slots are allocated as vLLM lays them out
(one A and one B stack per module and layer, ``max_loras x max_lora_rank``) and
``torch.cuda.memory_allocated`` is read, to check the arithmetic.

Usage: python benchmarks/lora_memory.py [--model qwen2.5-7b | --config HF_CONFIG.json]
       [--ranks 8 16 32 64] [--slots 16] [--host 128] [--disk-gib 100] [--measure]
Needs only torch (no vLLM, no Ray): it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Qwen2.5-7B-Instruct's config.json, the fields that set LoRA shapes
QWEN25_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def module_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each target module of one decoder layer (Llama/Qwen2 shape)."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    head = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head
    return {
        "q_proj": (h, cfg["num_attention_heads"] * head),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (cfg["num_attention_heads"] * head, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def params_per_rank(cfg: dict, targets: list[str]) -> int:
    shapes = module_shapes(cfg)
    return cfg["num_hidden_layers"] * sum(sum(shapes[t]) for t in targets)


def measure_gpu_slots(cfg: dict, targets: list[str], slots: int, rank: int, dtype: str) -> int:
    """Bytes torch allocates for vLLM-shaped LoRA slot stacks on the GPU."""
    import torch

    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    kept = []
    for _ in range(cfg["num_hidden_layers"]):
        for t in targets:
            fin, fout = module_shapes(cfg)[t]
            kept.append(
                torch.zeros(slots, 1, rank, fin, dtype=getattr(torch, dtype), device="cuda")
            )
            kept.append(
                torch.zeros(slots, 1, fout, rank, dtype=getattr(torch, dtype), device="cuda")
            )
    torch.cuda.synchronize()
    used = torch.cuda.memory_allocated() - before
    del kept
    torch.cuda.empty_cache()
    return used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--config", type=Path, help="A Hugging Face config.json instead.")
    ap.add_argument("--targets", nargs="*", default=TARGETS)
    ap.add_argument("--ranks", type=int, nargs="*", default=[8, 16, 32, 64])
    ap.add_argument("--slots", type=int, default=16, help="max_adapters_per_batch")
    ap.add_argument("--host", type=int, default=128, help="max_adapters_per_replica")
    ap.add_argument("--disk-gib", type=float, default=100)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(BYTES))
    ap.add_argument("--trained-dtype", default="float32", choices=sorted(BYTES))
    ap.add_argument("--measure", action="store_true", help="Allocate the GPU slots (CUDA).")
    args = ap.parse_args()
    cfg = json.loads(args.config.read_text()) if args.config else QWEN25_7B
    if args.measure:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--measure needs a CUDA GPU; this machine has none")
    per_rank = params_per_rank(cfg, args.targets)
    b, disk_b = BYTES[args.dtype], BYTES[args.trained_dtype]
    print(
        f"{args.config or args.model}: {per_rank:,} LoRA parameters per rank "
        f"({len(args.targets)} modules x {cfg['num_hidden_layers']} layers)\n"
    )
    print(
        f"| rank | one adapter ({args.dtype}) | GPU: {args.slots} slots at this max_lora_rank "
        f"| host: {args.host} adapters | disk: one version ({args.trained_dtype}) "
        f"| versions in {args.disk_gib:g} GiB |"
    )
    print("|---|---|---|---|---|---|")
    for r in args.ranks:
        one = per_rank * r * b
        row = (
            f"| {r} | {one / 2**20:.0f} MiB | {args.slots * one / 2**30:.2f} GiB "
            f"| {args.host * one / 2**30:.1f} GiB | {per_rank * r * disk_b / 2**20:.0f} MiB "
            f"| {int(args.disk_gib * 2**30 // (per_rank * r * disk_b))} |"
        )
        if args.measure:
            got = measure_gpu_slots(cfg, args.targets, args.slots, r, args.dtype)
            row += f" measured GPU slots: {got / 2**30:.2f} GiB |"
        print(row)


if __name__ == "__main__":
    main()
