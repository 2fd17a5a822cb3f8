"""What users run: the pipeline (`chatrlhf train`), preflight, the demos, eval, chat, serve, report and data
inspection. Apps may import every layer below them; nothing below imports an app."""
