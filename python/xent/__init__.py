"""xent: fused cross-entropy for LLM training, every CUDA kernel written in Rust.

- ``xent.torch``: the PyTorch API (functional ``cross_entropy``, ``CrossEntropyLoss``, the seed's
  ``CrossEntropyFunction`` and ``TritonCausalLMLoss``); CUDA tensors run the Rust kernels on
  PyTorch's current stream, CPU tensors run the f64 CPU reference.
- ``xent.numpy``: the same computation on host arrays (NumPy, or any CPU ``__dlpack__`` object),
  through the CPU reference.
- ``xent.Options``: a call's options, checked once (PyTorch's and Liger's names and defaults).
"""

from ._xent import Options, __version__, cuda_device_count

__all__ = ["Options", "__version__", "cuda_device_count"]
