"""splitlm: split-learning fine-tuning of causal LMs across edge devices."""

__version__ = "0.1.0"
