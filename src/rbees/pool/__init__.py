"""``rbees-pool``: one machine's pool, managed locally (and remotely through ``rbees`` over SSH).

Modules: ``cli`` (Typer, thin) and ``render`` (tables, progress); ``settings`` (pool home, pool.toml,
env); ``catalog`` (catalog.json) and ``models`` (register / download / unregister) with ``download``
(the hub) and ``sources`` (local paths, the embedded SmolLM2 wheel); ``spawn`` with ``preflight``,
``ports``, ``ready`` (the ready-callback listener) and ``records`` (workers/<id>.json); ``workers``
(list, prune), ``stop``, ``status``; ``errors`` (messages and exit codes).
"""
