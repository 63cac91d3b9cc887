"""The tiny base model's shape: a Llama-architecture causal LM small enough to pretrain
on two CPU cores, shaped so vLLM's CPU backend serves it (head size 32, float32).

Owns: :class:`TinyLlamaSpec` and its translation into ``transformers.LlamaConfig``.
Does not own: training (``pretrain``) or the tokenizer (``tokenizer``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from loraplex.config import StrictModel

if TYPE_CHECKING:
    from transformers import LlamaConfig

VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class TinyLlamaSpec(StrictModel):
    hidden_size: int = Field(default=128, ge=32)
    num_layers: int = Field(default=4, ge=1)
    num_heads: int = Field(default=4, ge=1)
    intermediate_size: int = Field(default=352, ge=32)
    max_positions: int = Field(default=1024, ge=128)
    rope_theta: float = Field(default=10000.0, gt=0)

    @model_validator(mode="after")
    def _servable(self) -> TinyLlamaSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        head = self.hidden_size // self.num_heads
        if head not in VLLM_CPU_HEAD_SIZES:
            raise ValueError(
                f"head size {head} is not one vLLM's CPU backend supports "
                f"({', '.join(map(str, VLLM_CPU_HEAD_SIZES))})"
            )
        return self

    def to_hf(self, vocab_size: int, pad_id: int, eos_id: int) -> LlamaConfig:
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            max_position_embeddings=self.max_positions,
            rope_theta=self.rope_theta,
            tie_word_embeddings=True,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            bos_token_id=None,
            torch_dtype="float32",
        )
