"""Node-side conversion (`python -m clusterctl.convert`): ZeRO checkpoint -> servable Hugging Face folder.

checkpoint.py reads the rank files lazily; layout.py maps checkpoint tensors to the model's standard names;
sfio.py streams safetensors; staging.py owns the output folder's life cycle; nodes.py lets several nodes
share the work; verify.py proves the result; core.py ties them together.  swap.py sizes and provisions
swap for the convert job; fp8.py casts DeepSeek-V3's released FP8 weights to BF16.
"""
