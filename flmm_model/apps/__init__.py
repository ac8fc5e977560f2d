"""What users run on their own images: `predict.py` (masks for phrases, chat with grounded answers, from the command
line) and `demo.py` (the Gradio web demo)."""
