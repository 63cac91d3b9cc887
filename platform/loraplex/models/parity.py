"""Greedy generation with transformers and with vLLM (CPU) on the same prompts.

Owns: running both engines in float32 on chat-formatted prompts and comparing their
first N tokens. vLLM runs in a subprocess of its own (``python -m
loraplex.models.parity``): it spawns workers and sizes its KV cache against host
memory, and neither should leak into the caller. Does not own: choosing prompts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from loraplex.errors import LoraplexError


def chat_prompts(model_dir: Path, user_messages: Sequence[str]) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [
        tok.apply_chat_template(
            [{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True
        )
        for m in user_messages
    ]


def hf_greedy(model_dir: Path, prompts: Sequence[str], n_tokens: int) -> list[list[int]]:
    """Plain argmax decoding for ``n_tokens`` steps: the end token is an ordinary token
    here, exactly as with vLLM's ``ignore_eos`` (``generate(min_new_tokens=...)`` would
    instead forbid it and so diverge wherever the model wants to stop)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            result = model(input_ids=ids, use_cache=True)
            generated: list[int] = []
            for _ in range(n_tokens):
                nxt = int(result.logits[0, -1].argmax())
                generated.append(nxt)
                result = model(
                    input_ids=torch.tensor([[nxt]]),
                    past_key_values=result.past_key_values,
                    use_cache=True,
                )
            out.append(generated)
    return out


def vllm_greedy(
    model_dir: Path, prompts: Sequence[str], n_tokens: int, timeout_s: float = 600
) -> list[list[int]]:
    """Greedy token ids from vLLM, run in a subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        request = Path(tmp) / "request.json"
        result = Path(tmp) / "result.json"
        request.write_text(
            json.dumps({"model": str(model_dir), "prompts": list(prompts), "n_tokens": n_tokens})
        )
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        }
        proc = subprocess.run(
            [sys.executable, "-m", "loraplex.models.parity", str(request), str(result)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
        )
        if proc.returncode != 0 or not result.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise LoraplexError(f"vLLM could not generate with {model_dir}: {tail[0][:300]}")
        return json.loads(result.read_text())["tokens"]


def agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]], n_tokens: int) -> float:
    """The fraction of prompts whose first ``n_tokens`` agree exactly."""
    same = sum(list(x[:n_tokens]) == list(y[:n_tokens]) for x, y in zip(a, b, strict=True))
    return same / len(a) if a else 0.0


def _vllm_main(request_path: str, result_path: str) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    req = json.loads(Path(request_path).read_text())
    tok = AutoTokenizer.from_pretrained(req["model"])
    llm = LLM(model=req["model"], dtype="float32", max_model_len=1024, seed=0, enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=req["n_tokens"], ignore_eos=True)
    prompts = [
        TokensPrompt(prompt_token_ids=tok(p, add_special_tokens=False)["input_ids"])
        for p in req["prompts"]
    ]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    Path(result_path).write_text(
        json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outputs]})
    )


if __name__ == "__main__":
    _vllm_main(sys.argv[1], sys.argv[2])
