"""`leantune serve`: an OpenAI-compatible HTTP server over one base model and many adapters.

- `adapters.py`: loading adapters of any method over one shared base (no copy of its weights), and the per-row
  LoRA layer that lets requests for different LoRA adapters share one batch.
- `cache.py`: the slot KV cache (one row per batch slot, each row at its own length).
- `engine.py`: the scheduler thread that owns the model: continuous batching over the slots, per-row sampling,
  stop ids and strings, the bounded queue.
- `seq2seq_engine.py`: the same engine for an encoder-decoder (T5): batched encoder passes, each row's decoder
  and cross-attention keys/values held as rows of one decoding cache (the model kind picks the engine class).
- `protocol.py` / `app.py`: OpenAI's request and response shapes, errors, SSE streaming, the FastAPI app.
"""
