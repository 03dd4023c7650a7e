"""Integrations with other libraries (each imported on demand; none is a hard dependency).

``mra_compile.integrations.transformers`` (``pip install 'mra-compile[hf]'``): importing it
registers ``attn_implementation="mra"`` in Hugging Face ``transformers``' attention
registry (``hf_attention``: BERT, RoBERTa, ModernBERT and every other model that dispatches
through ``AttentionInterface``), and ``patch_mra_model`` / ``unpatch_mra_model`` make an
``MraModel`` (or any of its task heads) compute its attention with ``torch.ops.mra.attention``.
"""
