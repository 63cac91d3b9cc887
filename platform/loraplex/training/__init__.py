"""Fine-tuning: Ray Train + HF Trainer + PEFT LoRA + DeepSpeed jobs, tracked in MLflow,
adapters versioned in the MLflow registry.

Modules: ``config`` (the job config), ``dataset`` (JSONL -> token rows), ``worker``
(the per-worker loop), ``job`` (one job end to end), ``registry`` (adapters in MLflow).
"""
