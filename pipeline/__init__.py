"""The reference reproducible MNIST pipeline: fetch → preprocess → train → report."""
