"""One pure function per loss, named after its method: tensors in, tensors out."""

from rlcourse.losses.sft import dft_loss, sft_loss

__all__ = ["sft_loss", "dft_loss"]
