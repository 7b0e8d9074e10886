"""The model: loading a Hugging Face causal LM (or the tiny one built here) for training,
and running it with the fused judge head of ``real_kernels`` (``head``)."""
