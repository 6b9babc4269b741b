"""How good a tokenizer or a prior is: PSNR/SSIM/codebook metrics, the Inception network and FID, and
reconstruction evaluation over whole datasets."""
