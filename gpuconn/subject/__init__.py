"""Subject level: motion and confounds, physiological regressors, QC and denoising of each run."""
