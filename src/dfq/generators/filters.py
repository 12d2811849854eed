"""Image filters applied to synthetic images (they know nothing of P or Q)."""

from __future__ import annotations

import torch

__all__ = ["lowpass"]


def lowpass(images: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Gaussian low-pass filter in the Fourier domain; ``cutoff`` is the standard deviation as a
    fraction of the Nyquist frequency."""
    h, w = images.shape[-2:]
    fy = torch.fft.fftfreq(h).reshape(-1, 1) * 2  # in units of Nyquist
    fx_ = torch.fft.fftfreq(w).reshape(1, -1) * 2
    mask = torch.exp(-(fy**2 + fx_**2) / (2 * cutoff**2))
    return torch.fft.ifft2(torch.fft.fft2(images.float()) * mask).real
