"""The reference reproducible MNIST pipeline: fetch → preprocess → train → report."""

import os

# TensorFlow's C++ start-up notices say nothing a user can act on; it reads this when it loads, after us.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
