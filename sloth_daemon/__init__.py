"""sloth-daemon: continuous online LoRA fine-tuning service."""
__version__ = "0.1.0"
