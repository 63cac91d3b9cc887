"""Serving: vLLM behind Ray Serve, many adapters, retrieval routes, one OpenAI endpoint.

Modules: ``config`` (the typed serving config), ``builder`` (config -> application),
``ingress`` (the OpenAI front door), ``adapters`` (registry -> vLLM), ``hybrid``
(prompt with sources, citations), ``metrics``, ``ray_llm`` (Ray Serve LLM imports).
"""
