"""lowmem_vt: memory-efficient single-GPU R1-Zero GRPO for Qwen2-VL.

The Triton kernels live in the repository's top-level ``kernels/`` folder and import as ``lowmem_vt.kernels``
(``lowmem_vt/kernels`` is a link to it). That folder has no ``__init__.py`` on purpose: in the repository root,
a regular package of that name would answer to ``import kernels`` ahead of the pip package ``kernels`` that
transformers and bitsandbytes import, whatever was imported first. A folder without ``__init__.py`` is only a
namespace portion, and the import system takes any regular package of the same name over it. So the kernels'
API is imported from its modules: ``lowmem_vt.kernels.head``, ``.chunked_logprobs``, ``.fused_linear``, ...
"""
