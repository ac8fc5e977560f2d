"""What users run on their own images: `predict.py` (masks for phrases, chat with grounded answers, from the command
line) and `demo/` (the Gradio web demo: `session.py`, the checked model calls without Gradio; `app.py`, the tabs and
the server). Both load a checkpoint and write masks through `recipes/inference.py`."""
