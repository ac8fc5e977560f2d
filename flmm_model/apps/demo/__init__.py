"""The web demo: `session.py` (the checked model calls, no Gradio) and `app.py` (the Gradio tabs and the server)."""
