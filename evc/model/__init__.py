"""The model as the spec names it: loaded from timm, Hugging Face or the user's code, with its checkpoint, input and data."""
