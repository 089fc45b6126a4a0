"""``rbees-workerd``: the dumb worker. Loads one model, streams tokens over SSE, cancels, drains.

Layout (dependencies point down)::

    main        CLI -> WorkerSettings, start-up checks, uvicorn, SIGTERM drain, exit codes
    app         FastAPI routes /execute /cancel /health and the error envelope
    runtime     state: loading thread, admission (slots), job threads, cancel, drain
    jobs        the decode loop of one job: stop reasons and events (no HTTP)
    streaming   UTF-8 safe incremental detokenizer, stop-sequence matcher (pure)
    slots, auth, callback, settings, modelfiles
    engines/    the Engine interface and the transformers engine (sampling, chat
                templates in a Jinja sandbox, devices, GGUF conversion cache)

Decisions where the spec is open:

- A duplicate ``job_id`` of a running job is a 400 ``INVALID_REQUEST`` with
  ``details.reason = "duplicate_job_id"`` (the issue lists it among the 400s).
- ``CONTEXT_LENGTH_EXCEEDED`` (400) when the prompt leaves no room for one generated token
  (prompt tokens >= context). A prompt that fits but would overflow with ``max_tokens`` is
  served and stops at the end of the context with ``MAX_TOKENS``.
- ``token.i`` counts token events from 0; an event may carry several model tokens (a
  character split across tokens, text held back as a possible stop sequence).
  ``end.tokens_out`` counts model tokens generated (the EOS token is not counted).
- Unknown ``job_id`` on ``/cancel`` is a 202 with ``{"cancelled": false}``.
"""
