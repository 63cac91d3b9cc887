"""The embedded tiny base model: tokenizer, architecture, pretraining, bootstrap."""
