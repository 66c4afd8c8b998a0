"""clusterctl: fine-tune DeepSeek-V3/R1 (and any Hugging Face causal LM) on your own GPU cluster."""
__version__ = "0.1.0"
