"""cotune: LoRA fine-tuning of LLaVA-CoT and other LLaMA-architecture vision-language models."""

import warnings

# PEFT 0.21 asks transformers 5.x for `is_gradient_checkpointing`, which transformers deprecates in
# favour of `is_activation_checkpointing`: every adapter load would print this, and nothing is wrong.
warnings.filterwarnings(
    "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
)
