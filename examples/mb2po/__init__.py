"""MB2PO example: AWAC pre-training and conservative model-based fine-tuning (``python -m examples.mb2po.mb2po``)."""
