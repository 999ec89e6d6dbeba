"""Import before Triton in kernel tests: without CUDA, Triton kernels run under its interpreter.

TRITON_INTERPRET must be set before Triton is imported, and then applies to every Triton kernel the
process defines (on a CPU they could not run otherwise). The interpreter multiplies bf16 operands as their
raw bits, so on the CPU fp16 stands in for bf16 (`HALF`).
"""

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = torch.device("cuda" if CUDA else "cpu")
HALF = torch.bfloat16 if CUDA else torch.float16


def patch_interpreter() -> None:
    """Triton 3.6's interpreter turns 1-element arrays into loop bounds with int(), which numpy >= 2.4
    refuses (triton-lang/triton#9171, fixed upstream): read the element instead."""
    if CUDA:
        return
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "seekforge", False):
        return

    def patch_index(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_index.seekforge = True
    interpreter._patch_lang_tensor = patch_index
