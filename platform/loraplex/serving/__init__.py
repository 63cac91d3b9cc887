"""Serving: vLLM behind Ray Serve, many adapters, retrieval routes, one OpenAI endpoint.

Modules: ``config`` (the typed serving config), ``scaling`` (replicas and queues),
``builder`` (config -> application), ``gate`` (keys, body size and limits, as
middleware), ``limits`` (per-key buckets), ``ingress`` (the OpenAI front door),
``grounding`` (retrieval narrowed by the key, prompt with sources, citations),
``responses`` (answers and streams), ``errors`` (OpenAI error bodies), ``adapters``
(registry -> vLLM), ``metrics``, ``ray_llm`` (Ray Serve LLM imports).
"""
