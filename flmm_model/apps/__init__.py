"""What users run on their own images: `predict.py` (masks for phrases, chat with grounded answers, from the command
line) and `demo/` (the Gradio web demo: `session.py` checks and runs requests, `app.py` lays out the tabs)."""
