"""Raw text: reading corpus files and normalizing what they hold (used by tokenizer and data alike)."""
