"""Base models: the one home of importing, registering, listing and resolving them.

``builtin`` names the models loraplex can import offline, ``importer`` turns a source
(GGUF file, HF folder, hub id, built-in name) into a checked HF folder under
``LORAPLEX_HOME/models/<name>``, ``registry`` records base models in the MLflow
registry, and ``resolve`` turns any reference a config may hold (``embedded``, an
imported name, a folder, ``models:/NAME@alias``) into a local folder. Training, serving
and evaluation only ever call ``resolve``.
"""
