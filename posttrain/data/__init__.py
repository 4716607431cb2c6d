"""Chat templates, tokenisation with assistant-only masks, packing collators and datasets."""
