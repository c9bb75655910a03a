"""Applications on the library: the command line and the Gradio demo."""
