"""The model as the spec names it: from timm, Hugging Face or the user's code, its checkpoint, input, data."""
