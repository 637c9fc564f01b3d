"""Model creation from external weights, data loading, fine-tuning and evaluation (torch + timm only)."""
