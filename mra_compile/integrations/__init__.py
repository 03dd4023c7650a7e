"""Integrations with other libraries (each imported on demand; none is a hard dependency).

``mra_compile.integrations.transformers``: ``patch_mra_model`` / ``unpatch_mra_model`` make
a Hugging Face ``MraModel`` (or any of its task heads) compute its attention with
``torch.ops.mra.attention`` -- install with ``pip install 'mra-compile[hf]'``.
"""
