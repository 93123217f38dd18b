"""Adapters that run other libraries' models on longctx's kernels.

- transformers: `import longctx.integrations.transformers` registers attn_implementation
  "longctx" with HuggingFace transformers (an optional dependency: `pip install longctx[hf]`).

Nothing is imported here: each adapter imports its library only when it is imported itself.
"""
