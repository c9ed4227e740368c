"""The prompt of the golden logits (train.py golden, make_ids.py): a KJV phrase as plain
text, then the chat format asking the demo question."""
GOLDEN_TEXT = ("<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
               "<|im_user|>user<|im_middle|>Tell me about the town by the sea.<|im_end|>"
               "<|im_assistant|>assistant<|im_middle|>")
GOLDEN_PLAIN = "And the LORD spake unto Moses, saying, Speak unto the children of Israel, "
