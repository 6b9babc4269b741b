"""How good generated or reconstructed images are: PSNR/SSIM, the Inception network and FID. Nothing here
needs a model of this repository; the reconstruction evaluation of a VQGAN is :mod:`vqgan.evaluation`."""
